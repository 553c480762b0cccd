"""Doctor's output: a ✔/✘ table with the fix under each ✘, or the same as JSON.

Every doctor check (log signatures, checks against a running deployment) becomes a
Check; the exit status is non-zero exactly when one of them failed. "warn" (!) is for
what is worth seeing but not wrong by itself (a transfer that resumed), and never
changes the exit status.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field

STATUSES = ("ok", "warn", "fail")
_MARK = {"ok": "✔", "warn": "!", "fail": "✘"}
EXIT_OK, EXIT_FAILED = 0, 1


@dataclass(frozen=True)
class Check:
    id: str
    title: str
    status: str
    subject: str = ""                       # the worker, address or file it is about
    details: tuple[str, ...] = ()           # one line each: counts, times, an example
    fix: str = ""                           # shown under a ✘ or !
    data: dict = field(default_factory=dict)  # extra fields for --json

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "status": self.status,
                "subject": self.subject, "details": list(self.details), "fix": self.fix,
                **self.data}


def exit_code(checks: list[Check]) -> int:
    return EXIT_FAILED if any(c.status == "fail" for c in checks) else EXIT_OK


def render_text(checks: list[Check], width: int = 100) -> str:
    lines = []
    for c in checks:
        head = f"{_MARK[c.status]} {c.title}"
        if c.subject:
            head += f" — {c.subject}"
        lines.append(head)
        if c.status == "ok":
            continue
        for d in c.details:
            lines.extend(textwrap.wrap(d, width, initial_indent="    ",
                                       subsequent_indent="      ") or ["    "])
        if c.fix:
            lines.extend(textwrap.wrap(c.fix, width, initial_indent="    fix: ",
                                       subsequent_indent="         "))
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings, "
                 f"{len(checks) - failed - warned} ok")
    return "\n".join(lines)


def render_json(checks: list[Check]) -> str:
    return json.dumps({"ok": exit_code(checks) == EXIT_OK,
                       "checks": [c.to_json() for c in checks]}, indent=2, ensure_ascii=False)
