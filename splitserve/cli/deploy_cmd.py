"""`splitserve deploy kubernetes`: render a whole deployment's manifests (frontend,
prefill and decode workers, etcd, the secret) into a directory or onto stdout. Defaults
come from DeploySpec, so a default lives in one place."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from splitserve.config import ConfigError
from splitserve.deploy.config import DEVICES, ENGINES, ETCD_TLS_MOUNT, MODEL_MOUNT, DeploySpec

_D = {f.name: f.default for f in fields(DeploySpec)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    targets = parser.add_subparsers(dest="target", required=True, metavar="TARGET")
    k = targets.add_parser("kubernetes", help="Deployments/LeaderWorkerSets, Services, etcd, Secret")
    k.set_defaults(parser=k)
    k.add_argument("--out", metavar="DIR", help="write one YAML file per object into this new or "
                                                "empty directory (default: stdout)")
    k.add_argument("--image", required=True, help="the splitserve container image")
    k.add_argument("--name", default=_D["name"],
                   help="prefix of every object and the discovery namespace (default: %(default)s)")
    k.add_argument("--namespace", default=_D["namespace"], help="Kubernetes namespace (default: %(default)s)")
    model = k.add_argument_group("model")
    model.add_argument("--model", default=_D["model"],
                       help=f"checkpoint directory inside the container, under {MODEL_MOUNT} when "
                            f"storage is mounted (default: the image's embedded model)")
    storage = model.add_mutually_exclusive_group()
    storage.add_argument("--model-pvc", default=_D["model_pvc"], metavar="CLAIM",
                         help=f"PersistentVolumeClaim holding the model, mounted read-only at {MODEL_MOUNT}")
    storage.add_argument("--model-host-path", default=_D["model_host_path"], metavar="DIR",
                         help=f"host directory holding the model, mounted read-only at {MODEL_MOUNT}")
    model.add_argument("--served-model-name", default=_D["served_model_name"])
    workers = k.add_argument_group("workers")
    workers.add_argument("--prefill", type=int, default=_D["prefill"], metavar="N",
                         help="prefill workers (default: %(default)s)")
    workers.add_argument("--decode", type=int, default=_D["decode"], metavar="M",
                         help="decode workers (default: %(default)s)")
    workers.add_argument("--engine", choices=ENGINES, default=_D["engine"],
                         help="vllm needs an image with the vLLM engine backend (default: %(default)s)")
    workers.add_argument("--device", choices=DEVICES, default=_D["device"],
                         help="splitserve engine: cpu or cuda (one GPU) (default: cpu; vllm: cuda)")
    workers.add_argument("--tensor-parallel-size", type=int, default=_D["tensor_parallel_size"],
                         metavar="N", help="vllm: GPUs per worker, over all its nodes "
                                           "(default: %(default)s)")
    workers.add_argument("--nodes-per-worker", type=int, default=_D["nodes_per_worker"], metavar="N",
                         help="vllm: nodes one worker spans; above 1 each worker is a "
                              "LeaderWorkerSet group (default: %(default)s)")
    workers.add_argument("--gpu-resource", default=_D["gpu_resource"],
                         help="extended resource name of a GPU (default: %(default)s)")
    workers.add_argument("--startup-budget", type=int, default=_D["startup_budget_s"],
                         metavar="SECONDS", help="how long a worker may take to load its model "
                                                 "before it is restarted (default: %(default)s)")
    workers.add_argument("--worker-arg", action="append", default=[], metavar="FLAG",
                         help="one more `splitserve worker` argument, e.g. --worker-arg=--max-model-len "
                              "--worker-arg=32768 (repeatable)")
    ports = k.add_argument_group("ports")
    ports.add_argument("--frontend-port", type=int, default=_D["frontend_port"],
                       help="OpenAI API port of the frontend and its Service (default: %(default)s)")
    ports.add_argument("--worker-port", type=int, default=_D["worker_port"],
                       help="workers' internal API port (default: %(default)s)")
    ports.add_argument("--kv-port", type=int, default=_D["kv_port"],
                       help="prefill workers' KV port (default: %(default)s)")
    cluster = k.add_argument_group("discovery and secret")
    cluster.add_argument("--etcd", default=_D["etcd"], metavar="URL",
                         help="an external etcd://HOST:PORT (default: render an etcd StatefulSet)")
    cluster.add_argument("--etcd-image", default=_D["etcd_image"], help="(default: %(default)s)")
    cluster.add_argument("--etcd-tls-secret", default=_D["etcd_tls_secret"], metavar="SECRET",
                         help=f"external etcd over TLS: a Secret holding ca.crt (and tls.crt, "
                              f"tls.key with --etcd-client-cert), mounted at {ETCD_TLS_MOUNT}")
    cluster.add_argument("--etcd-client-cert", action="store_true",
                         default=_D["etcd_client_cert"],
                         help="present the TLS Secret's tls.crt/tls.key to etcd as a client "
                              "certificate")
    cluster.add_argument("--etcd-user", default=_D["etcd_user"], metavar="NAME",
                         help="external etcd's user (with --etcd-password-secret)")
    cluster.add_argument("--etcd-password-secret", default=_D["etcd_password_secret"],
                         metavar="SECRET", help="a Secret holding the etcd user's password "
                         "under key password, given to every process as $SPLITSERVE_ETCD_PASSWORD")
    cluster.add_argument("--secret-name", default=_D["secret_name"],
                         help="Secret holding the deployment's secret under key kv-secret "
                              "(default: NAME-kv-secret)")
    cluster.add_argument("--no-create-secret", dest="create_secret", action="store_false",
                         help="the Secret exists already: reference it, render none")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from splitserve.deploy.render import new_secret, write_directory, write_stream

    try:
        spec = DeploySpec(
            image=args.image, name=args.name, namespace=args.namespace, model=args.model,
            model_pvc=args.model_pvc, model_host_path=args.model_host_path,
            served_model_name=args.served_model_name, prefill=args.prefill, decode=args.decode,
            engine=args.engine, device=args.device, tensor_parallel_size=args.tensor_parallel_size,
            nodes_per_worker=args.nodes_per_worker, frontend_port=args.frontend_port,
            worker_port=args.worker_port, kv_port=args.kv_port, etcd=args.etcd,
            etcd_image=args.etcd_image, etcd_tls_secret=args.etcd_tls_secret,
            etcd_client_cert=args.etcd_client_cert, etcd_user=args.etcd_user,
            etcd_password_secret=args.etcd_password_secret, secret_name=args.secret_name,
            create_secret=args.create_secret, startup_budget_s=args.startup_budget,
            gpu_resource=args.gpu_resource, worker_args=tuple(args.worker_arg))
    except ConfigError as e:
        parser.error(str(e))
    if args.out is None:
        write_stream(spec, sys.stdout, new_secret())
        return 0
    try:
        paths = write_directory(spec, args.out, new_secret())
    except OSError as e:
        parser.error(str(e))
    print(f"wrote {len(paths)} manifests to {args.out}; apply with: kubectl apply -f {args.out}",
          file=sys.stderr)
    return 0
