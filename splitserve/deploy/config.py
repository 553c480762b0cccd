"""What `splitserve deploy` renders: one frozen, validated description of a deployment.

Every port lives here exactly once; the manifests derive each containerPort, each
command-line flag and each probe from these fields, so a probe can never point at a port
nothing listens on. Validation names the field, so a bad spec fails before anything is
written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from splitserve.config import ConfigError

ENGINES = ("splitserve", "vllm")
DEVICES = ("cpu", "cuda")
# Model storage (a PVC or a host directory) is mounted read-only here in worker pods.
MODEL_MOUNT = "/models"
# A multi-node (LeaderWorkerSet) worker's Ray head listens here on its leader pod.
RAY_PORT = 6379
# An external etcd's TLS Secret is mounted read-only here: ca.crt (the CA that signed
# etcd's certificate) and, with a client certificate, tls.crt and tls.key (the keys of a
# kubernetes.io/tls Secret).
ETCD_TLS_MOUNT = "/etc/splitserve/etcd"
# Flags `deploy` sets itself on every worker; passing them again through worker_args
# would contradict the rendered ports, addresses or discovery (or put the secret on a
# command line).
OWNED_WORKER_FLAGS = ("--role", "--host", "--port", "--kv-port", "--advertise-host",
                      "--discovery", "--namespace", "--kv-secret", "--model",
                      "--served-model-name", "--device", "--engine", "--tensor-parallel-size",
                      "--port-file", "--etcd-cacert", "--etcd-cert", "--etcd-key", "--etcd-user")

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_RESOURCE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# Object names are NAME-SUFFIX (longest: "-frontend"; LeaderWorkerSet pods add a group
# and member index to the name and a revision hash to labels), all within 63 characters.
MAX_NAME = 40


@dataclass(frozen=True)
class DeploySpec:
    image: str                               # the splitserve image every pod runs
    name: str = "splitserve"                 # prefix of every object; also the discovery namespace
    namespace: str = "default"               # Kubernetes namespace
    model: str | None = None                 # checkpoint directory in the container (None: embedded default)
    model_pvc: str | None = None             # PVC holding the model, mounted at MODEL_MOUNT
    model_host_path: str | None = None       # or a host directory, mounted at MODEL_MOUNT
    served_model_name: str | None = None
    prefill: int = 1                         # prefill workers
    decode: int = 1                          # decode workers
    engine: str = "splitserve"               # vllm: needs the vLLM engine backend in the image
    device: str | None = None                # splitserve engine: cpu (default) or cuda; vllm: cuda
    tensor_parallel_size: int = 1            # GPUs one worker uses, over all its nodes (vllm)
    nodes_per_worker: int = 1                # >1: each worker is a LeaderWorkerSet group
    frontend_port: int = 8000
    worker_port: int = 8100                  # worker API (/generate, /health, /live, ...)
    kv_port: int = 8200                      # prefill workers' KV port
    etcd: str | None = None                  # external etcd://HOST:PORT; None: an in-cluster StatefulSet
    etcd_image: str = "quay.io/coreos/etcd:v3.5.17"
    etcd_tls_secret: str | None = None       # external etcd over TLS: Secret with ca.crt,
    etcd_client_cert: bool = False           # and tls.crt/tls.key for --client-cert-auth
    etcd_user: str | None = None             # external etcd's user; its password from:
    etcd_password_secret: str | None = None  # a Secret with key "password"
    secret_name: str | None = None           # None: NAME-kv-secret
    create_secret: bool = True               # False: the Secret exists already (key "kv-secret")
    startup_budget_s: int = 1800             # how long a worker may take to load its model
    gpu_resource: str = "nvidia.com/gpu"
    worker_args: tuple[str, ...] = ()        # more `splitserve worker` flags, e.g. --max-model-len

    def __post_init__(self) -> None:
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"image must be a non-empty image reference, got {self.image!r}")
        if not _DNS_LABEL.match(self.name) or len(self.name) > MAX_NAME:
            raise ConfigError(f"name must be a DNS label (lowercase letters, digits, '-', starting "
                              f"with a letter) of at most {MAX_NAME} characters, got {self.name!r}")
        if not _DNS_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ConfigError(f"namespace must be a DNS label, got {self.namespace!r}")
        self._check_model()
        for field_name in ("prefill", "decode"):
            if not 1 <= getattr(self, field_name) <= 1000:
                raise ConfigError(f"{field_name} must be 1..1000 workers, got {getattr(self, field_name)}")
        self._check_engine()
        self._check_ports()
        if self.etcd is not None:
            self._check_etcd()
        self._check_etcd_auth()
        for field_name in ("secret_name", "etcd_tls_secret", "etcd_password_secret"):
            value = getattr(self, field_name)
            if value is not None and (not _DNS_SUBDOMAIN.match(value) or len(value) > 253):
                raise ConfigError(f"{field_name} must be a DNS subdomain, got {value!r}")
        if not 10 <= self.startup_budget_s <= 86400:
            raise ConfigError(f"startup_budget_s must be 10..86400 seconds, got {self.startup_budget_s}")
        if not _RESOURCE_NAME.match(self.gpu_resource):
            raise ConfigError(f"gpu_resource must be a resource name like nvidia.com/gpu, got "
                              f"{self.gpu_resource!r}")
        for arg in self.worker_args:
            if arg.split("=", 1)[0] in OWNED_WORKER_FLAGS:
                raise ConfigError(f"worker_args must not set {arg.split('=', 1)[0]}: deploy sets it "
                                  f"from the spec (flags it owns: {', '.join(OWNED_WORKER_FLAGS)})")

    def _check_model(self) -> None:
        if self.model_pvc is not None and self.model_host_path is not None:
            raise ConfigError("give model_pvc or model_host_path, not both")
        if self.model_pvc is not None and not _DNS_SUBDOMAIN.match(self.model_pvc):
            raise ConfigError(f"model_pvc must be a PVC name, got {self.model_pvc!r}")
        if self.model_host_path is not None and not self.model_host_path.startswith("/"):
            raise ConfigError(f"model_host_path must be an absolute path, got {self.model_host_path!r}")
        if self.model is not None and not self.model.startswith("/"):
            raise ConfigError(f"model must be an absolute path in the container, got {self.model!r}")
        if self.mounts_model:
            if self.model is None:
                raise ConfigError(f"model storage is mounted at {MODEL_MOUNT}: give model, the "
                                  f"checkpoint directory under it (e.g. {MODEL_MOUNT}/Llama-3.1-8B)")
            if not (self.model == MODEL_MOUNT or self.model.startswith(MODEL_MOUNT + "/")):
                raise ConfigError(f"model {self.model!r} is not under {MODEL_MOUNT}, where the "
                                  f"model storage is mounted")

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.device is not None and self.device not in DEVICES:
            raise ConfigError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.tensor_parallel_size < 1 or self.nodes_per_worker < 1:
            raise ConfigError(f"tensor_parallel_size and nodes_per_worker must be >= 1, got "
                              f"{self.tensor_parallel_size} and {self.nodes_per_worker}")
        if self.engine == "splitserve":
            if self.tensor_parallel_size != 1 or self.nodes_per_worker != 1:
                raise ConfigError("engine 'splitserve' runs on one device: tensor_parallel_size and "
                                  "nodes_per_worker must be 1 (use engine 'vllm' for more)")
            return
        if self.device == "cpu":
            raise ConfigError("engine 'vllm' runs on GPUs: device must be cuda (or unset)")
        if self.tensor_parallel_size % self.nodes_per_worker:
            raise ConfigError(f"tensor_parallel_size {self.tensor_parallel_size} must be a multiple "
                              f"of nodes_per_worker {self.nodes_per_worker} (each node holds an "
                              f"equal share of the GPUs)")

    def _check_ports(self) -> None:
        ports = {"frontend_port": self.frontend_port, "worker_port": self.worker_port,
                 "kv_port": self.kv_port}
        if self.nodes_per_worker > 1:
            ports["Ray's port"] = RAY_PORT
        for field_name, port in ports.items():
            if not 1 <= port <= 65535:
                raise ConfigError(f"{field_name} must be 1..65535, got {port}")
        seen: dict[int, str] = {}
        for field_name, port in ports.items():
            if port in seen:
                raise ConfigError(f"{field_name} and {seen[port]} are both {port}: every port must "
                                  f"be distinct")
            seen[port] = field_name

    def _check_etcd(self) -> None:
        # The processes parse this URL at start-up; parse it the same way now.
        from splitserve.discovery import DiscoveryError, parse_discovery

        if not self.etcd.startswith("etcd://"):
            raise ConfigError(f"etcd must be an etcd://HOST:PORT URL, got {self.etcd!r}")
        try:
            parse_discovery(self.etcd, namespace=self.name)
        except DiscoveryError as e:
            raise ConfigError(f"etcd: {e}") from None

    def _check_etcd_auth(self) -> None:
        given = [f for f in ("etcd_tls_secret", "etcd_user") if getattr(self, f) is not None]
        if given and self.etcd is None:
            raise ConfigError(f"{' and '.join(given)} apply to an external etcd (etcd): the "
                              f"in-cluster etcd deploy renders has neither TLS nor users")
        if self.etcd_client_cert and self.etcd_tls_secret is None:
            raise ConfigError("etcd_client_cert needs etcd_tls_secret, the Secret holding "
                              "tls.crt and tls.key")
        if (self.etcd_user is None) != (self.etcd_password_secret is None):
            raise ConfigError("etcd_user and etcd_password_secret go together: the user's "
                              "password reaches the processes only from that Secret")
        if self.etcd_user is not None and (not self.etcd_user
                                           or any(c.isspace() for c in self.etcd_user)):
            raise ConfigError(f"etcd_user must be a non-empty name without spaces, got "
                              f"{self.etcd_user!r}")

    @property
    def mounts_model(self) -> bool:
        return self.model_pvc is not None or self.model_host_path is not None

    @property
    def kv_secret_name(self) -> str:
        return self.secret_name or f"{self.name}-kv-secret"

    @property
    def etcd_service(self) -> str:
        return f"{self.name}-etcd"

    @property
    def discovery_url(self) -> str:
        return self.etcd or f"etcd://{self.etcd_service}.{self.namespace}.svc:2379"

    @property
    def gpus_per_pod(self) -> int:
        """GPUs each worker pod requests: the engine's share of tensor parallelism."""
        if self.engine == "vllm":
            return self.tensor_parallel_size // self.nodes_per_worker
        return 1 if self.device == "cuda" else 0
