"""`splitserve doctor`: name what is wrong, with the fix for each ✘.

`doctor --frontend URL | --discovery URL` asks a running deployment
(splitserve/doctor/deployment.py); `doctor --manifests DIR` checks Kubernetes manifests'
probes and ports against what each container listens on (splitserve/doctor/manifests.py;
with either of the above, both run); `doctor logs FILE…` reads log files of splitserve,
vLLM (NIXL), Dynamo or NIXL/UCX (splitserve/doctor/logs.py).

Kept free of heavy imports at module level: main.py imports this to build the parser.
Exit status: 0 when nothing failed, 1 when a check failed, 2 when doctor could not run
(an unreadable log file: a doctor that skipped it would report ✔ for what it never saw).
"""

from __future__ import annotations

import argparse
import os
import sys

from splitserve.cli.discovery_args import add_discovery_args

EXIT_CANNOT_RUN = 2
DEFAULT_BANDWIDTH_MB = 256   # "a few hundred MB": long enough to see the link, not the RTT


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frontend", metavar="URL", help="a running frontend, e.g. "
                   "http://10.0.0.5:8000 (workers from its /cluster; or --discovery)")
    p.add_argument("--manifests", metavar="DIR",
                   help="Kubernetes manifests (rendered by `deploy kubernetes` or hand-written): "
                        "every probe, containerPort and Service targetPort against the port the "
                        "container's splitserve listens on")
    p.add_argument("--kv-secret", default=None,
                   help="the deployment's secret, for the workers' API (default: "
                        "$SPLITSERVE_KV_SECRET)")
    p.add_argument("--api-key", default=None,
                   help="the frontend's API key (default: $SPLITSERVE_API_KEY)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt-tokens", type=int, metavar="N",
                        help="check a prompt of N tokens against the context limit")
    prompt.add_argument("--prompt-file", metavar="F",
                        help="count F's tokens as one chat message with the served model's "
                             "tokenizer and chat template (needs --frontend), against the "
                             "context limit")
    p.add_argument("--bandwidth-mb", type=int, default=DEFAULT_BANDWIDTH_MB, metavar="MB",
                   help="synthetic KV each decode worker fetches from each prefill worker to "
                        "measure the link; 0 skips it (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    # The deployment's own discovery flags (etcd TLS files and user included), as its
    # workers and frontend take them.
    add_discovery_args(p, "doctor")
    sub = p.add_subparsers(dest="doctor_command", metavar="WHAT")
    logs = sub.add_parser(
        "logs", help="name the failure classes in log files of splitserve, vLLM (NIXL), "
                     "Dynamo or NIXL/UCX")
    logs.add_argument("files", nargs="+", metavar="FILE", help="log files to read")
    # SUPPRESS: `doctor --json logs F` and `doctor logs --json F` both work.
    logs.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="print the report as JSON")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from splitserve.doctor.report import exit_code, render_json, render_text

    if args.doctor_command == "logs":
        from splitserve.doctor.logs import checks_from_findings, scan
        try:
            checks = checks_from_findings(scan(args.files), args.files)
        except OSError as e:
            print(f"splitserve doctor: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
            return EXIT_CANNOT_RUN
    else:
        if not (args.frontend or args.discovery or args.manifests):
            parser.error("give --frontend URL, --discovery URL or --manifests DIR, or "
                         "`doctor logs FILE…`")
        checks = []
        if args.manifests:
            from splitserve.doctor.manifests import diagnose_manifests
            try:
                checks += diagnose_manifests(args.manifests)
            except OSError as e:
                print(f"splitserve doctor: cannot read {e.filename}: {e.strerror}",
                      file=sys.stderr)
                return EXIT_CANNOT_RUN
        if args.frontend or args.discovery:
            checks += _diagnose_deployment(parser, args)
    print(render_json(checks) if args.json else render_text(checks))
    return exit_code(checks)


def _diagnose_deployment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list:
    from splitserve.cli.discovery_args import discovery_from_args
    from splitserve.doctor.deployment import diagnose
    from splitserve.frontend.auth import API_KEY_ENV
    from splitserve.worker.config import SECRET_ENV

    if args.frontend and args.discovery:
        parser.error("give --frontend URL or --discovery URL, not both")
    if args.bandwidth_mb < 0:
        parser.error("--bandwidth-mb must be >= 0")
    if args.prompt_file and not args.frontend:
        parser.error("--prompt-file needs --frontend (it holds the tokenizer and chat "
                     "template)")
    discovery = discovery_from_args(parser, args)
    return diagnose(args.frontend, discovery, args.kv_secret or os.environ.get(SECRET_ENV) or None,
                    args.api_key or os.environ.get(API_KEY_ENV) or None,
                    args.prompt_tokens, args.prompt_file, args.bandwidth_mb << 20,
                    discovery_url=args.discovery)
