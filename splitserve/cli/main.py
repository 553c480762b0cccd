"""The `splitserve` command line (also `python -m splitserve`).

Subcommand modules are imported only when they run, so `splitserve --help` stays fast
and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from splitserve.bench import BENCHES
from splitserve.cli.deploy_cmd import add_arguments as add_deploy_arguments
from splitserve.cli.discovery_args import add_discovery_args
from splitserve.cli.doctor_cmd import add_arguments as add_doctor_arguments
from splitserve.cli.engine_args import add_engine_arguments, add_transfer_args, add_worker_args
from splitserve.cli.frontend_args import add_frontend_args
from splitserve.cli.logs import LEVELS
from splitserve.cli.supervision_args import add_supervision_args
from splitserve.vllm_connector.proxy_args import add_arguments as add_vllm_proxy_arguments
from splitserve.cli.vllm_args import add_vllm_arguments


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=LEVELS, default="info")


def _listen(p: argparse.ArgumentParser, port: int, what: str) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=port,
                   help=f"{what} port; 0 picks a free one (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="Disaggregated LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run frontend + prefill and decode workers on this machine")
    _listen(serve, 8000, "OpenAI API")
    serve.add_argument("--port-file", help="write the API port here once everything is healthy")
    # None (not 1) as the default: `--aggregated --prefill 1` must be refused, not ignored.
    serve.add_argument("--prefill", type=int, default=None, metavar="N",
                       help="prefill workers (default: 1)")
    serve.add_argument("--decode", type=int, default=None, metavar="M",
                       help="decode workers (default: 1)")
    serve.add_argument("--aggregated", action="store_true",
                       help="one `both` worker doing prefill and decode, no KV transfer")
    add_engine_arguments(serve)
    add_vllm_arguments(serve)
    add_transfer_args(serve)
    add_frontend_args(serve)
    add_discovery_args(serve, "serve")
    add_supervision_args(serve)
    _common(serve)
    serve.set_defaults(module="splitserve.cli.serve_cmd", parser=serve)

    frontend = sub.add_parser("frontend", help="run the OpenAI-compatible frontend")
    _listen(frontend, 8000, "OpenAI API")
    frontend.add_argument("--worker-url", action="append",
                          help="a fixed worker base URL, e.g. http://127.0.0.1:8100 (repeatable; "
                               "instead of --discovery)")
    frontend.add_argument("--port-file", help="write the bound port here once listening")
    add_frontend_args(frontend)
    frontend.add_argument("--kv-secret", default=None,
                          help="the deployment's secret, sent to the workers' API (default: "
                               "$SPLITSERVE_KV_SECRET)")
    add_discovery_args(frontend, "frontend")
    _common(frontend)
    frontend.set_defaults(module="splitserve.cli.frontend_cmd", parser=frontend)

    worker = sub.add_parser("worker", help="run one engine behind the internal worker API")
    _listen(worker, 0, "internal API")
    add_worker_args(worker)
    worker.add_argument("--port-file", help="write the bound port here once listening")
    add_engine_arguments(worker)
    add_vllm_arguments(worker)
    add_transfer_args(worker)
    add_discovery_args(worker, role="worker")
    _common(worker)
    worker.set_defaults(module="splitserve.cli.worker_cmd", parser=worker)

    doctor = sub.add_parser("doctor", help="name what is wrong in a running deployment, or in "
                                           "log files (`doctor logs`)")
    add_doctor_arguments(doctor)
    doctor.set_defaults(module="splitserve.cli.doctor_cmd", parser=doctor)

    deploy = sub.add_parser("deploy", help="render manifests for a deployment "
                                           "(`deploy kubernetes`)")
    add_deploy_arguments(deploy)
    deploy.set_defaults(module="splitserve.cli.deploy_cmd")

    vllm_proxy = sub.add_parser("vllm-proxy", help="disaggregate two plain `vllm serve` that use "
                                                   "splitserve.vllm_connector")
    add_vllm_proxy_arguments(vllm_proxy)
    _common(vllm_proxy)
    vllm_proxy.set_defaults(module="splitserve.vllm_connector.proxy", parser=vllm_proxy)

    bench = sub.add_parser("bench", help="run a benchmark")
    bench.add_argument("name", choices=sorted(BENCHES), help="which benchmark")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(module=None, parser=bench)
    return parser


def _run_bench(args: argparse.Namespace) -> int:
    # Only the chosen benchmark's module is imported; it defines its own flags.
    parser = argparse.ArgumentParser(prog=f"splitserve bench {args.name}")
    module = importlib.import_module(BENCHES[args.name])
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.bench_args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        return _run_bench(args)
    return importlib.import_module(args.module).run(args.parser, args)
