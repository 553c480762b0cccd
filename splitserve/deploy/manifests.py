"""DeploySpec -> Kubernetes objects, as plain dicts (pure functions; render.py writes them).

Invariants:
- Each serving container is built by `_serving_container` from ONE port value: the
  `--port` flag, the containerPort and every probe's port come from the same variable,
  so a probe/port mismatch cannot be rendered. The KV port likewise feeds both the
  `--kv-port` flag and its containerPort.
- The deployment's secret reaches processes only as $SPLITSERVE_KV_SECRET from a Secret
  (secretKeyRef); it is never on a command line, where `ps` and the pod spec show it. An
  external etcd's password likewise, as $SPLITSERVE_ETCD_PASSWORD; its TLS files are a
  Secret mounted read-only, the flags naming them derived from the same mount path.
- Workers listen on 0.0.0.0 and advertise their pod IP (downward API), never loopback.
"""

from __future__ import annotations

from splitserve.cli.discovery_args import PASSWORD_ENV
from splitserve.deploy.config import ETCD_TLS_MOUNT, MODEL_MOUNT, RAY_PORT, DeploySpec
from splitserve.worker.config import SECRET_ENV

SECRET_KEY = "kv-secret"
ETCD_PASSWORD_KEY = "password"
PROBE_PERIOD_S = 10
ETCD_CLIENT_PORT = 2379
_POD_IP = {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def render_objects(spec: DeploySpec, secret_value: str) -> list[dict]:
    """Every object of the deployment, in the order `kubectl apply` should create them.
    secret_value is only used when spec.create_secret."""
    objects: list[dict] = []
    if spec.create_secret:
        objects.append(_secret(spec, secret_value))
    if spec.etcd is None:
        objects += [_etcd_service(spec), _etcd_statefulset(spec)]
    for role, count in (("prefill", spec.prefill), ("decode", spec.decode)):
        objects.append(_worker_lws(spec, role, count) if spec.nodes_per_worker > 1
                       else _worker_deployment(spec, role, count))
    objects += [_frontend_deployment(spec), _frontend_service(spec)]
    return objects


def _labels(spec: DeploySpec, component: str) -> dict:
    return {"app.kubernetes.io/name": "splitserve", "app.kubernetes.io/instance": spec.name,
            "app.kubernetes.io/component": component}


def _meta(spec: DeploySpec, name: str, component: str) -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": _labels(spec, component)}


def _secret(spec: DeploySpec, value: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": _meta(spec, spec.kv_secret_name, "secret"),
            "type": "Opaque", "stringData": {SECRET_KEY: value}}


def _secret_env(spec: DeploySpec) -> dict:
    return {"name": SECRET_ENV,
            "valueFrom": {"secretKeyRef": {"name": spec.kv_secret_name, "key": SECRET_KEY}}}


def _etcd_args(spec: DeploySpec) -> list[str]:
    args = []
    if spec.etcd_tls_secret is not None:
        args += ["--etcd-cacert", f"{ETCD_TLS_MOUNT}/ca.crt"]
        if spec.etcd_client_cert:
            args += ["--etcd-cert", f"{ETCD_TLS_MOUNT}/tls.crt",
                     "--etcd-key", f"{ETCD_TLS_MOUNT}/tls.key"]
    if spec.etcd_user is not None:
        args += ["--etcd-user", spec.etcd_user]
    return args


def _etcd_env(spec: DeploySpec) -> list[dict]:
    if spec.etcd_password_secret is None:
        return []
    return [{"name": PASSWORD_ENV, "valueFrom": {"secretKeyRef": {
        "name": spec.etcd_password_secret, "key": ETCD_PASSWORD_KEY}}}]


def _etcd_volumes(spec: DeploySpec) -> tuple[list[dict], list[dict]]:
    """The TLS Secret, its keys listed: a Secret missing one fails the pod's start with
    an event naming the key, not the process later with a missing file."""
    if spec.etcd_tls_secret is None:
        return [], []
    keys = ["ca.crt", *(["tls.crt", "tls.key"] if spec.etcd_client_cert else [])]
    return ([{"name": "etcd-tls", "secret": {"secretName": spec.etcd_tls_secret,
                                             "items": [{"key": k, "path": k} for k in keys]}}],
            [{"name": "etcd-tls", "mountPath": ETCD_TLS_MOUNT, "readOnly": True}])


def _probes(port: int, ready_path: str, startup_path: str, startup_budget_s: int) -> dict:
    """Readiness on /health (ready to serve), liveness on /live (the process answers; a
    worker's /live answers while its model loads), and a startupProbe that holds the other
    two off for up to startup_budget_s, so a long model load is never killed."""
    def get(path: str) -> dict:
        return {"httpGet": {"path": path, "port": port}, "timeoutSeconds": 5}
    return {
        "startupProbe": {**get(startup_path), "periodSeconds": PROBE_PERIOD_S,
                         "failureThreshold": -(-startup_budget_s // PROBE_PERIOD_S)},
        "readinessProbe": {**get(ready_path), "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**get("/live"), "periodSeconds": PROBE_PERIOD_S, "failureThreshold": 6},
    }


def _serving_container(name: str, image: str, command: list[str], args: list[str], port: int,
                       *, startup_path: str, startup_budget_s: int,
                       extra_ports: tuple[tuple[str, str, int], ...] = ()) -> dict:
    """A container serving HTTP on `port`: the --port flag, containerPort and probes all
    from that one value. extra_ports: (name, flag, number) for other listening ports,
    each flag and containerPort from one value too."""
    args = [*args, "--port", str(port)]
    ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    for port_name, flag, number in extra_ports:
        args += [flag, str(number)]
        ports.append({"name": port_name, "containerPort": number, "protocol": "TCP"})
    return {"name": name, "image": image, "command": command, "args": args, "ports": ports,
            **_probes(port, "/health", startup_path, startup_budget_s)}


def _model_volumes(spec: DeploySpec) -> tuple[list[dict], list[dict]]:
    volumes, mounts = [], []
    if spec.model_pvc is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model_pvc,
                                                                   "readOnly": True}})
    elif spec.model_host_path is not None:
        volumes.append({"name": "model", "hostPath": {"path": spec.model_host_path,
                                                      "type": "Directory"}})
    if volumes:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if spec.engine == "vllm":
        # NCCL between a worker's GPUs uses /dev/shm; a container's default is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _gpu_resources(spec: DeploySpec) -> dict:
    gpus = spec.gpus_per_pod
    if not gpus:
        return {}
    amount = {spec.gpu_resource: str(gpus)}
    return {"resources": {"requests": amount, "limits": dict(amount)}}


def _worker_args(spec: DeploySpec, role: str) -> list[str]:
    args = ["worker", "--role", role, "--host", "0.0.0.0", "--advertise-host", "$(POD_IP)",
            "--discovery", spec.discovery_url, "--namespace", spec.name, *_etcd_args(spec)]
    if spec.model is not None:
        args += ["--model", spec.model]
    if spec.served_model_name is not None:
        args += ["--served-model-name", spec.served_model_name]
    if spec.engine == "vllm":
        # The vLLM engine backend (a separate piece of work) reads these two flags.
        args += ["--engine", "vllm", "--tensor-parallel-size", str(spec.tensor_parallel_size)]
    elif spec.device is not None:
        args += ["--device", spec.device]
    return [*args, *spec.worker_args]


def _worker_pod_spec(spec: DeploySpec, role: str, *, leader: bool) -> dict:
    """The pod that runs `splitserve worker`. A LeaderWorkerSet leader first starts the
    group's Ray head, which the group's other pods join, then execs the worker."""
    args = _worker_args(spec, role)
    command = ["splitserve"]
    if leader:
        command = ["sh", "-c", f'ray start --head --port={RAY_PORT} && exec "$0" "$@"']
        args = ["splitserve", *args]
    extra = (("kv", "--kv-port", spec.kv_port),) if role == "prefill" else ()
    container = _serving_container(role, spec.image, command, args, spec.worker_port,
                                   startup_path="/health", startup_budget_s=spec.startup_budget_s,
                                   extra_ports=extra)
    volumes, mounts = _model_volumes(spec)
    etcd_volumes, etcd_mounts = _etcd_volumes(spec)
    volumes, mounts = volumes + etcd_volumes, mounts + etcd_mounts
    container["env"] = [_POD_IP, _secret_env(spec), *_etcd_env(spec)]
    container.update(_gpu_resources(spec))
    return _pod(container, volumes, mounts)


def _pod(container: dict, volumes: list, mounts: list) -> dict:
    """A one-container pod spec, with the volumes and mounts only when there are any."""
    if mounts:
        container["volumeMounts"] = mounts
    pod = {"containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    return pod


def _worker_deployment(spec: DeploySpec, role: str, replicas: int) -> dict:
    labels = _labels(spec, role)
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(spec, f"{spec.name}-{role}", role),
            "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": _worker_pod_spec(spec, role, leader=False)}}}


def _ray_member_pod_spec(spec: DeploySpec, role: str) -> dict:
    """A non-leader pod of a multi-node worker: it lends its GPUs to the leader's engine
    through Ray (LWS_LEADER_ADDRESS is set by the LeaderWorkerSet controller)."""
    volumes, mounts = _model_volumes(spec)
    container = {"name": f"{role}-member", "image": spec.image,
                 "command": ["sh", "-c", f"exec ray start --address=$LWS_LEADER_ADDRESS:{RAY_PORT} "
                                         f"--block"],
                 **_gpu_resources(spec)}
    return _pod(container, volumes, mounts)


def _worker_lws(spec: DeploySpec, role: str, replicas: int) -> dict:
    labels = _labels(spec, role)
    return {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet",
            "metadata": _meta(spec, f"{spec.name}-{role}", role),
            "spec": {"replicas": replicas, "leaderWorkerTemplate": {
                "size": spec.nodes_per_worker,
                # One engine spans the group: a member that restarts breaks it.
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": {"metadata": {"labels": labels},
                                   "spec": _worker_pod_spec(spec, role, leader=True)},
                "workerTemplate": {"metadata": {"labels": labels},
                                   "spec": _ray_member_pod_spec(spec, role)}}}}


def _frontend_deployment(spec: DeploySpec) -> dict:
    labels = _labels(spec, "frontend")
    args = ["frontend", "--host", "0.0.0.0", "--discovery", spec.discovery_url,
            "--namespace", spec.name, *_etcd_args(spec)]
    # The frontend's /health is 503 until a worker is ready: its startupProbe waits on
    # /live, so a slow model load delays its readiness, never restarts it.
    container = _serving_container("frontend", spec.image, ["splitserve"], args,
                                   spec.frontend_port, startup_path="/live",
                                   startup_budget_s=spec.startup_budget_s)
    container["env"] = [_secret_env(spec), *_etcd_env(spec)]
    pod = {"containers": [container]}
    volumes, mounts = _etcd_volumes(spec)
    if volumes:
        container["volumeMounts"], pod["volumes"] = mounts, volumes
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(spec, f"{spec.name}-frontend", "frontend"),
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": pod}}}


def _frontend_service(spec: DeploySpec) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(spec, f"{spec.name}-frontend", "frontend"),
            "spec": {"selector": _labels(spec, "frontend"),
                     "ports": [{"name": "http", "port": spec.frontend_port,
                                "targetPort": spec.frontend_port, "protocol": "TCP"}]}}


def _etcd_service(spec: DeploySpec) -> dict:
    # Headless: the StatefulSet's governing service; clients resolve it to the pod.
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(spec, spec.etcd_service, "etcd"),
            "spec": {"clusterIP": "None", "selector": _labels(spec, "etcd"),
                     "ports": [{"name": "client", "port": ETCD_CLIENT_PORT,
                                "targetPort": ETCD_CLIENT_PORT}]}}


def _etcd_statefulset(spec: DeploySpec) -> dict:
    labels = _labels(spec, "etcd")
    url = f"http://{spec.etcd_service}.{spec.namespace}.svc:{ETCD_CLIENT_PORT}"
    health = {"httpGet": {"path": "/health", "port": ETCD_CLIENT_PORT}, "timeoutSeconds": 5}
    container = {
        "name": "etcd", "image": spec.etcd_image, "command": ["etcd"],
        "args": ["--data-dir=/var/lib/etcd",
                 f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
                 f"--advertise-client-urls={url}"],
        "ports": [{"name": "client", "containerPort": ETCD_CLIENT_PORT, "protocol": "TCP"}],
        "readinessProbe": {**health, "periodSeconds": 5},
        "livenessProbe": {**health, "periodSeconds": PROBE_PERIOD_S, "failureThreshold": 6},
        # Discovery records are leased and re-put by every worker's heartbeat: nothing
        # here outlives the pods that wrote it, so the pod's own disk is enough.
        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}]}
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": _meta(spec, spec.etcd_service, "etcd"),
            "spec": {"serviceName": spec.etcd_service, "replicas": 1,
                     "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [container],
                                           "volumes": [{"name": "data", "emptyDir": {}}]}}}}
