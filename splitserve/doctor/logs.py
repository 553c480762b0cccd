"""Read log files and count the failure signatures in them.

Each line is matched against the signature table (first matching class wins, see
signatures.py). Per class: how many lines, the first and last time, one example line,
the request ids (when the line names one), the count per detail (fallback reason,
refusal code) and per file.

Times: each system stamps lines differently; the formats understood are ISO-8601
(splitserve's "2026-12-02 19:54:37,123", Dynamo's "2025-05-13T13:47:38.880Z"), vLLM's
"WARNING 09-24 16:35:21" (no year), and UCX's "[1700000000.123456]" epoch seconds. A
line with no recognisable time still counts; it just does not move first/last. vLLM's
year-less stamps compare among themselves only (they sort before any dated line).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from splitserve.doctor.report import Check
from splitserve.doctor.signatures import SIGNATURES, Signature

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ISO = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:[.,](\d{1,9}))?")
_VLLM = re.compile(r"\b(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL) (\d{2})-(\d{2}) "
                   r"(\d{2}:\d{2}:\d{2})(?:\.(\d{1,6}))?")
_EPOCH = re.compile(r"^\[(\d{9,11})\.(\d{1,9})\]")
_MAX_EXAMPLE = 400       # characters of the example line kept
MAX_REQUEST_IDS = 50     # per class: enough to grep for, bounded for huge logs


@dataclass(frozen=True, order=True)
class Stamp:
    """A time as the log printed it; `at` orders stamps, `text` shows it."""
    at: datetime
    text: str


def parse_time(line: str) -> Stamp | None:
    m = _ISO.search(line)
    if m:
        frac = (m.group(3) or "0")[:6].ljust(6, "0")
        at = datetime.fromisoformat(f"{m.group(1)}T{m.group(2)}.{frac}")
        return Stamp(at, f"{m.group(1)} {m.group(2)}")
    m = _VLLM.search(line)
    if m:
        month, day, hms = int(m.group(1)), int(m.group(2)), m.group(3)
        try:
            # Year 1904: a leap year, so "02-29" parses; the text shows no year.
            at = datetime.fromisoformat(f"1904-{month:02d}-{day:02d}T{hms}")
        except ValueError:
            return None
        return Stamp(at, f"{month:02d}-{day:02d} {hms}")
    m = _EPOCH.match(line)
    if m:
        at = datetime.fromtimestamp(int(m.group(1)), timezone.utc).replace(tzinfo=None)
        return Stamp(at, at.strftime("%Y-%m-%d %H:%M:%S") + " UTC")
    return None


@dataclass
class Finding:
    """What one signature class matched across all files."""
    signature: Signature
    count: int = 0
    first: Stamp | None = None
    last: Stamp | None = None
    example: str = ""
    example_at: str = ""            # "file:line" of the example
    request_ids: list[str] = field(default_factory=list)
    by_detail: Counter = field(default_factory=Counter)
    by_file: Counter = field(default_factory=Counter)
    by_system: Counter = field(default_factory=Counter)

    def add(self, line: str, where: str, file: str, system: str, stamp: Stamp | None,
            rid: str | None, detail: str | None) -> None:
        self.count += 1
        if not self.example:
            self.example, self.example_at = line[:_MAX_EXAMPLE], where
        if stamp is not None:
            self.first = stamp if self.first is None else min(self.first, stamp)
            self.last = stamp if self.last is None else max(self.last, stamp)
        if rid and rid not in self.request_ids and len(self.request_ids) < MAX_REQUEST_IDS:
            self.request_ids.append(rid)
        if detail:
            self.by_detail[detail] += 1
        self.by_file[file] += 1
        self.by_system[system] += 1

    def to_json(self) -> dict:
        s = self.signature
        return {"id": s.id, "title": s.title, "failure": s.failure, "found": self.count > 0,
                "count": self.count, "first": self.first.text if self.first else None,
                "last": self.last.text if self.last else None, "example": self.example,
                "example_at": self.example_at, "request_ids": self.request_ids,
                "by_detail": dict(self.by_detail), "by_file": dict(self.by_file),
                "by_system": dict(self.by_system), "fix": s.fix}


def match_line(line: str) -> tuple[Signature, str, str | None, str | None] | None:
    """(class, system, request id, detail) of the first class whose pattern matches."""
    for sig in SIGNATURES:
        for pat in sig.patterns:
            m = pat.regex.search(line)
            if m:
                groups = m.groupdict()
                return sig, pat.system, groups.get("rid"), groups.get("detail")
    return None


def scan(paths: Iterable[str | Path]) -> list[Finding]:
    """One Finding per signature class, in table order (found or not). Raises OSError
    for a file that cannot be read: a doctor that skips a log it was given would
    report ✔ for what it never saw."""
    findings = {s.id: Finding(s) for s in SIGNATURES}
    for path in paths:
        name = str(path)
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, raw in enumerate(f, 1):
                line = _ANSI.sub("", raw.rstrip("\r\n"))
                hit = match_line(line)
                if hit is None:
                    continue
                sig, system, rid, detail = hit
                findings[sig.id].add(line, f"{name}:{lineno}", name, system, parse_time(line),
                                     rid, detail)
    return list(findings.values())


def checks_from_findings(findings: list[Finding], files: list[str]) -> list[Check]:
    """One row per class: ✔ when no line showed it, else ✘ (or ! for a recovered
    class) with the count, first/last time, request ids, example and fix."""
    checks = []
    for f in findings:
        s = f.signature
        if not f.count:
            checks.append(Check(s.id, s.title, "ok", data=f.to_json()))
            continue
        span = (f"first {f.first.text}, last {f.last.text}" if f.first else
                "no timestamps in these lines")
        details = [f"{f.count} line(s) ({', '.join(f'{k}: {v}' for k, v in f.by_system.items())}); "
                   f"{span}"]
        if f.by_detail:
            details.append("by " + ", ".join(f"{k}: {v}" for k, v in f.by_detail.most_common()))
        if len(files) > 1:
            details.append("in " + ", ".join(f"{k}: {v}" for k, v in f.by_file.items()))
        if f.request_ids:
            more = "" if len(f.request_ids) < MAX_REQUEST_IDS else " …"
            details.append("request ids: " + " ".join(f.request_ids[:10]) +
                           (f" (+{len(f.request_ids) - 10})" if len(f.request_ids) > 10 else "")
                           + more)
        details.append(f"e.g. {f.example_at}: {f.example}")
        checks.append(Check(s.id, s.title, "fail" if s.failure else "warn", details=tuple(details),
                            fix=s.fix, data=f.to_json()))
    return checks
