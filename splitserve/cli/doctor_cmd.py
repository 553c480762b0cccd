"""`splitserve doctor logs FILE…`: name the failure classes in log files, with the fix.

Kept free of heavy imports at module level: main.py imports this to build the parser.
Exit status: 0 when nothing failed, 1 when a failure class was found, 2 when a file
could not be read (a doctor that skipped a log would report ✔ for what it never saw).
"""

from __future__ import annotations

import argparse
import sys

EXIT_UNREADABLE = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="doctor_command", required=True, metavar="WHAT")
    logs = sub.add_parser(
        "logs", help="name the failure classes in log files of splitserve, vLLM (NIXL), "
                     "Dynamo or NIXL/UCX")
    logs.add_argument("files", nargs="+", metavar="FILE", help="log files to read")
    logs.add_argument("--json", action="store_true", help="print the report as JSON")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from splitserve.doctor.logs import checks_from_findings, scan
    from splitserve.doctor.report import exit_code, render_json, render_text

    try:
        findings = scan(args.files)
    except OSError as e:
        print(f"splitserve doctor: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_UNREADABLE
    checks = checks_from_findings(findings, args.files)
    print(render_json(checks) if args.json else render_text(checks))
    return exit_code(checks)
