"""`splitserve doctor --manifests DIR`: every probe's port and path, every containerPort and
every Service targetPort against what the splitserve process in the container really
listens on and serves.

What a container listens on is read from its own command line, parsed by the real CLI
parser (so a default port or a flag spelling is exactly what the process would use):
the API on --port (frontend, serve, worker) and, for a prefill worker, KV on --kv-port.
Readiness must be GET /health and liveness GET /live on the API port (a worker's /live
answers while its model loads; /health not before it is ready); a startupProbe may use
either. Works on what `splitserve deploy kubernetes` renders and on hand-written
manifests alike; containers that do not run splitserve (etcd, Ray members) are skipped.
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
from dataclasses import dataclass

import yaml

from splitserve.doctor.report import Check

_COMMANDS = ("frontend", "serve", "worker")
_PATHS = {"readinessProbe": ("/health",), "livenessProbe": ("/live",),
          "startupProbe": ("/health", "/live")}
_WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job")


@dataclass(frozen=True)
class Container:
    subject: str               # "Deployment splitserve-frontend, container frontend"
    labels: dict               # the pod template's labels, for Services' selectors
    spec: dict                 # the container as written
    command: str               # frontend | serve | worker
    api_port: int              # 0: a random port
    kv_port: int | None        # a prefill worker's KV port (0: random); None: no KV port

    @property
    def listens(self) -> dict[int, str]:
        ports = {self.api_port: "--port"} if self.api_port else {}
        if self.kv_port:
            ports[self.kv_port] = "--kv-port"
        return ports

    def named_ports(self) -> dict[str, int]:
        return {p["name"]: p["containerPort"] for p in self.spec.get("ports") or []
                if p.get("name")}


def load_objects(directory: str) -> list[tuple[str, dict]]:
    """(file, object) for every object in DIR's *.yaml/*.yml/*.json files, in name order
    (List objects unpacked). Raises OSError for a DIR that cannot be read and
    yaml.YAMLError naming the file for one that does not parse."""
    objects = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith((".yaml", ".yml", ".json")):
            continue
        path = os.path.join(directory, name)
        with open(path, encoding="utf-8") as f:
            try:
                docs = list(yaml.safe_load_all(f))
            except yaml.YAMLError as e:
                raise yaml.YAMLError(f"{path}: {e}") from None
        for doc in docs:
            if isinstance(doc, dict):
                objects += [(path, o) for o in (doc.get("items") or [] if doc.get("kind") == "List"
                                                else [doc]) if isinstance(o, dict)]
    return objects


def _pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(label, pod template) of a workload: '' for the one template of a Deployment etc."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return [("", {"metadata": obj.get("metadata") or {}, "spec": spec})]
    if kind == "LeaderWorkerSet":
        t = spec.get("leaderWorkerTemplate") or {}
        return [(f" ({role})", t[key]) for role, key in (("leader", "leaderTemplate"),
                                                          ("worker", "workerTemplate")) if key in t]
    if kind in _WORKLOADS:
        return [("", spec.get("template") or {})]
    return []


def _splitserve_argv(container: dict) -> list[str] | None:
    """The arguments after `splitserve` in the container's command line (through `sh -c`
    wrappers too), or None when it does not run splitserve."""
    tokens = []
    for part in [*(container.get("command") or []), *(container.get("args") or [])]:
        part = str(part)
        if "splitserve" in part and any(c.isspace() for c in part):
            with contextlib.suppress(ValueError):
                tokens += shlex.split(part)
                continue
        tokens.append(part)
    for i, t in enumerate(tokens):
        if os.path.basename(t) == "splitserve" or t == "splitserve.cli.main":
            rest = tokens[i + 1:]
            if rest and rest[0] in _COMMANDS:
                return rest
    return None


def _parse(argv: list[str]) -> tuple[object | None, str]:
    from splitserve.cli.main import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args, _ = build_parser().parse_known_args(argv)
    except SystemExit:
        return None, (err.getvalue().strip().splitlines() or ["the CLI refused it"])[-1]
    return args, ""


def containers(objects: list[tuple[str, dict]]) -> tuple[list[Container], list[Check]]:
    """Every container that runs splitserve, and a ✘ for each whose command line the
    CLI refuses (the process would exit, so no port of it can be checked)."""
    found, checks = [], []
    for _, obj in objects:
        meta = obj.get("metadata") or {}
        for label, template in _pod_templates(obj):
            labels = (template.get("metadata") or {}).get("labels") or {}
            for c in (template.get("spec") or {}).get("containers") or []:
                argv = _splitserve_argv(c)
                if argv is None:
                    continue
                subject = f"{obj['kind']} {meta.get('name')}{label}, container {c.get('name')}"
                args, error = _parse(argv)
                if args is None:
                    checks.append(Check("manifest", "command line the splitserve CLI accepts",
                                        "fail", subject, (error,),
                                        "Fix the container's command/args: `splitserve "
                                        f"{argv[0]} --help` lists its flags."))
                    continue
                kv = args.kv_port if args.command == "worker" and args.role == "prefill" else None
                found.append(Container(subject, labels, c, args.command, args.port, kv))
    return found, checks


def _resolve(port, c: Container) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return c.named_ports().get(port)


def _listening(c: Container) -> str:
    return ", ".join(f"{p} ({flag})" for p, flag in c.listens.items()) or "a random port"


def check_container(c: Container) -> list[Check]:
    checks = []

    def fail(check_id: str, title: str, detail: str, fix: str) -> None:
        checks.append(Check(check_id, title, "fail", c.subject, (detail,), fix))

    if not c.api_port:
        fail("probe_port", "the API listens on a fixed port",
             f"`splitserve {c.command}` has no --port (or --port 0): it listens on a random "
             "port no probe or Service can name",
             "Give the container a fixed --port and point its probes and Service at it.")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        spec = c.spec.get(probe)
        if spec is None:
            if probe != "startupProbe":
                checks.append(Check("probe_missing", f"{probe} present", "warn", c.subject,
                                    (f"no {probe}",), f"Add {probe} httpGet "
                                    f"{_PATHS[probe][0]} on port {c.api_port or '(its --port)'}."))
            continue
        get = spec.get("httpGet")
        if get is None:
            handler = next((k for k in spec if k in ("tcpSocket", "exec", "grpc")), "no handler")
            fail("probe_path", f"{probe} is an HTTP GET of {' or '.join(_PATHS[probe])}",
                 f"{probe} is a {handler} probe, not httpGet: it cannot tell a loading or "
                 "broken server from a ready one",
                 f"Use {probe}: httpGet: {{path: {_PATHS[probe][0]}, port: {c.api_port}}}.")
            continue
        port = _resolve(get.get("port"), c)
        if c.api_port and port != c.api_port:
            named = ("" if port == get.get("port")
                     else f" (named port {get.get('port')!r} is {port})")
            fail("probe_port", f"{probe} port is the port the process listens on",
                 f"{probe} GETs port {get.get('port')}{named}, but `splitserve {c.command}` "
                 f"listens on {_listening(c)}",
                 f"Set {probe}.httpGet.port to {c.api_port} (the container's --port), or change "
                 f"--port, so both are the same value.")
        path = get.get("path") or "/"
        if path not in _PATHS[probe]:
            fail("probe_path", f"{probe} path is {' or '.join(_PATHS[probe])}",
                 f"{probe} GETs {path}; `splitserve {c.command}` serves readiness on /health "
                 "and liveness on /live",
                 f"Set {probe}.httpGet.path to {_PATHS[probe][0]}"
                 + (" (/health fails while a worker loads or has no ready worker behind it: as a "
                    "liveness probe it restarts a healthy process)" if probe == "livenessProbe"
                    else "."))
    declared = {}
    for p in c.spec.get("ports") or []:
        declared[p.get("containerPort")] = p.get("name")
    for number, name in declared.items():
        if number not in c.listens:
            fail("container_port", "every containerPort is a port the process listens on",
                 f"containerPort {number}{f' ({name})' if name else ''} is declared, but "
                 f"`splitserve {c.command}` listens on {_listening(c)}",
                 f"Change containerPort {number} to the port the process listens on, or pass "
                 f"that port with --port/--kv-port.")
    if not checks:
        checks.append(Check("container", f"probes and ports agree with what `splitserve "
                                         f"{c.command}` listens on: {_listening(c)}", "ok",
                            c.subject))
    return checks


def check_service(svc: dict, found: list[Container]) -> list[Check]:
    selector = (svc.get("spec") or {}).get("selector") or {}
    selected = [c for c in found
                if selector and all(c.labels.get(k) == v for k, v in selector.items())]
    if not selected:
        return []       # selects no splitserve container (etcd, or pods defined elsewhere)
    subject = f"Service {(svc.get('metadata') or {}).get('name')}"
    checks = []
    for port in (svc.get("spec") or {}).get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        for c in selected:
            number = _resolve(target, c)
            if number is None or number not in c.listens:
                shown = target if number in (None, target) else f"{target} (= {number})"
                checks.append(Check(
                    "service_port", "Service targetPort is a port the selected containers "
                    "listen on", "fail", subject,
                    (f"port {port.get('port')} forwards to targetPort {shown}, but {c.subject} "
                     f"(`splitserve {c.command}`) listens on {_listening(c)}",),
                    f"Set the Service's targetPort to {c.api_port} (the container's --port)."))
    if not checks:
        checks.append(Check("service", "Service targetPorts reach what the selected containers "
                                       "listen on", "ok", subject))
    return checks


def diagnose_manifests(directory: str) -> list[Check]:
    """Every check over DIR. Raises OSError when DIR cannot be read."""
    try:
        objects = load_objects(directory)
    except yaml.YAMLError as e:
        return [Check("manifest", "manifests parse as YAML", "fail", directory, (str(e),),
                      "Fix the YAML (kubectl apply --dry-run=client -f DIR names the line).")]
    found, checks = containers(objects)
    if not found and not checks:
        return [Check("manifest", "manifests run splitserve", "fail", directory,
                      ("no container in DIR runs `splitserve frontend|serve|worker`",),
                      "Point --manifests at the directory `splitserve deploy kubernetes --out` "
                      "wrote, or at manifests whose containers run splitserve.")]
    for c in found:
        checks += check_container(c)
    for _, obj in objects:
        if obj.get("kind") == "Service":
            checks += check_service(obj, found)
    return checks
