"""`splitserve deploy kubernetes`: what it renders is accepted by Kubernetes (validated
offline against the Kubernetes schemas, and LeaderWorkerSets against the CRD's published
schema), every probe and flag follows the one port value it was rendered from, and the
deployment's secret is never on a command line."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from splitserve.cli.discovery_args import discovery_from_args
from splitserve.cli.engine_args import engine_config_from_args, worker_config_from_args
from splitserve.cli.main import build_parser, main
from splitserve.config import ConfigError
from splitserve.deploy import DeploySpec, render_objects
from splitserve.worker.config import SECRET_ENV

K8S_VERSION = "1.33"
LWS_SCHEMA = json.loads((Path(__file__).parent / "data/lws/leaderworkerset-v1.schema.json").read_text())
SECRET = "s3cr3t-value-for-tests"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def _pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] == "LeaderWorkerSet":
        t = obj["spec"]["leaderWorkerTemplate"]
        return [t["leaderTemplate"]["spec"], t["workerTemplate"]["spec"]]
    if "template" in obj.get("spec", {}):
        return [obj["spec"]["template"]["spec"]]
    return []


def _containers(objects: list[dict]) -> list[dict]:
    return [c for obj in objects for pod in _pod_specs(obj) for c in pod["containers"]]


def _argv(container: dict) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def _flag(container: dict, flag: str) -> str:
    argv = _argv(container)
    return argv[argv.index(flag) + 1]


def _validate(objects: list[dict]) -> None:
    """Every object against the Kubernetes schemas (strict: unknown fields are errors);
    a LeaderWorkerSet against its CRD schema, and its two pod templates as PodTemplates."""
    for obj in objects:
        if obj["kind"] == "LeaderWorkerSet":
            jsonschema.Draft7Validator(LWS_SCHEMA).validate(obj)
            t = obj["spec"]["leaderWorkerTemplate"]
            for name in ("leaderTemplate", "workerTemplate"):
                kubernetes_validate.validate(
                    {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name},
                     "template": t[name]}, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def test_one_prefill_one_decode_on_one_node_renders_valid_manifests(tmp_path):
    out = tmp_path / "manifests"
    assert main(["deploy", "kubernetes", "--image", "example.com/splitserve:1", "--name", "llama",
                 "--namespace", "serving", "--model-pvc", "models", "--model", "/models/llama",
                 "--out", str(out)]) == 0
    objects = [yaml.safe_load(p.read_text()) for p in sorted(out.iterdir())]
    _validate(objects)
    kinds = _by_kind(objects)
    assert set(kinds) == {("Secret", "llama-kv-secret"), ("Service", "llama-etcd"),
                          ("StatefulSet", "llama-etcd"), ("Deployment", "llama-prefill"),
                          ("Deployment", "llama-decode"), ("Deployment", "llama-frontend"),
                          ("Service", "llama-frontend")}
    # Created in an order that works: the Secret and etcd before the processes using them.
    assert [o["kind"] for o in objects][:3] == ["Secret", "Service", "StatefulSet"]
    # Only its owner may read the rendered secret.
    secret_file = next(p for p in out.iterdir() if "secret" in p.name)
    assert secret_file.stat().st_mode & 0o077 == 0
    prefill = kinds[("Deployment", "llama-prefill")]["spec"]["template"]["spec"]["containers"][0]
    assert _argv(prefill)[:4] == ["splitserve", "worker", "--role", "prefill"]
    assert _flag(prefill, "--advertise-host") == "$(POD_IP)" and _flag(prefill, "--host") == "0.0.0.0"
    assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in prefill["env"]
    assert _flag(prefill, "--discovery") == "etcd://llama-etcd.serving.svc:2379"
    assert _flag(prefill, "--model") == "/models/llama"
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in prefill["volumeMounts"]
    assert "resources" not in prefill      # the splitserve engine on CPU asks for no GPU
    frontend = kinds[("Deployment", "llama-frontend")]["spec"]["template"]["spec"]["containers"][0]
    assert _argv(frontend)[:2] == ["splitserve", "frontend"]
    # The frontend needs no model storage (it gets the tokenizer from a worker).
    assert "volumeMounts" not in frontend
    # Rendering again into the same directory is refused: stale files would be applied.
    with pytest.raises(SystemExit) as e:
        main(["deploy", "kubernetes", "--image", "x", "--out", str(out)])
    assert e.value.code == 2


def test_workers_spanning_two_nodes_are_valid_leaderworkersets():
    spec = DeploySpec(image="example.com/splitserve:1", engine="vllm", tensor_parallel_size=16,
                      nodes_per_worker=2, prefill=2, decode=1, model_host_path="/data/models",
                      model="/models/llama-405b")
    objects = render_objects(spec, SECRET)
    _validate(objects)
    lws = [o for o in objects if o["kind"] == "LeaderWorkerSet"]
    assert [(o["metadata"]["name"], o["spec"]["replicas"]) for o in lws] == [
        ("splitserve-prefill", 2), ("splitserve-decode", 1)]
    assert not [o for o in objects if o["kind"] == "Deployment"
                and o["metadata"]["name"] != "splitserve-frontend"]
    for o in lws:
        t = o["spec"]["leaderWorkerTemplate"]
        assert t["size"] == 2
        leader = t["leaderTemplate"]["spec"]["containers"][0]
        member = t["workerTemplate"]["spec"]["containers"][0]
        argv = _argv(leader)
        assert argv[argv.index("--engine"):argv.index("--engine") + 4] == [
            "--engine", "vllm", "--tensor-parallel-size", "16"]
        # 16-way tensor parallelism over 2 nodes: 8 GPUs on each pod of the group.
        for c in (leader, member):
            assert c["resources"] == {"requests": {"nvidia.com/gpu": "8"},
                                      "limits": {"nvidia.com/gpu": "8"}}
        assert "LWS_LEADER_ADDRESS" in " ".join(_argv(member))


def test_single_node_vllm_workers_request_tensor_parallel_gpus():
    objects = render_objects(DeploySpec(image="i", engine="vllm", tensor_parallel_size=4,
                                        gpu_resource="amd.com/gpu"), SECRET)
    _validate(objects)
    workers = [c for c in _containers(objects) if "worker" in _argv(c)]
    assert len(workers) == 2
    for c in workers:
        assert c["resources"]["limits"] == {"amd.com/gpu": "4"}
        assert _flag(c, "--tensor-parallel-size") == "4"


@pytest.mark.parametrize("nodes", [1, 2])
def test_every_probe_and_flag_follows_the_ports(nodes):
    ports = {"frontend_port": 18123, "worker_port": 19001, "kv_port": 19002}
    spec = DeploySpec(image="i", engine="vllm", tensor_parallel_size=2, nodes_per_worker=nodes, **ports)
    objects = render_objects(spec, SECRET)
    _validate(objects)
    serving = [c for c in _containers(objects) if "--port" in _argv(c)]
    assert sorted(c["name"] for c in serving) == ["decode", "frontend", "prefill"]
    for c in serving:
        port = int(_flag(c, "--port"))
        assert port == (ports["frontend_port"] if c["name"] == "frontend" else ports["worker_port"])
        assert c["ports"][0]["containerPort"] == port
        for probe in PROBES:
            assert c[probe]["httpGet"]["port"] == port, (c["name"], probe)
        assert (c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]) == (
            "/health", "/live")
        if c["name"] == "prefill":
            assert int(_flag(c, "--kv-port")) == ports["kv_port"]
            assert {"name": "kv", "containerPort": ports["kv_port"], "protocol": "TCP"} in c["ports"]
        else:
            assert "--kv-port" not in _argv(c)
    service = _by_kind(objects)[("Service", "splitserve-frontend")]["spec"]["ports"][0]
    assert service["port"] == service["targetPort"] == ports["frontend_port"]
    # No default port survives anywhere in the rendered text.
    text = yaml.safe_dump_all(objects)
    for default in ("8000", "8100", "8200"):
        assert default not in text


def test_the_startup_probe_allows_the_whole_model_loading_budget():
    objects = render_objects(DeploySpec(image="i", startup_budget_s=3605), SECRET)
    for c in _containers(objects):
        if "startupProbe" in c:
            p = c["startupProbe"]
            assert p["periodSeconds"] * p["failureThreshold"] >= 3605
    workers = [c for c in _containers(objects) if "worker" in _argv(c)]
    # A worker's /live answers during the load; only /health says it is loaded.
    assert all(c["startupProbe"]["httpGet"]["path"] == "/health" for c in workers)


@pytest.mark.parametrize("create_secret", [True, False])
def test_the_secret_reaches_every_process_from_a_secret_never_a_command_line(create_secret, capsys):
    argv = ["deploy", "kubernetes", "--image", "i", "--secret-name", "team-secret", "--prefill", "2"]
    assert main(argv + ([] if create_secret else ["--no-create-secret"])) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    _validate(objects)
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert len(secrets) == (1 if create_secret else 0)
    processes = [c for c in _containers(objects) if c["name"] != "etcd"]
    assert len(processes) == 3
    for c in processes:
        assert {"name": SECRET_ENV, "valueFrom": {"secretKeyRef": {
            "name": "team-secret", "key": "kv-secret"}}} in c["env"]
        assert "--kv-secret" not in _argv(c)
    if create_secret:
        value = secrets[0]["stringData"]["kv-secret"]
        assert len(value) >= 32
        assert all(value not in arg for c in processes for arg in _argv(c))


def test_an_external_etcd_replaces_the_statefulset():
    objects = render_objects(DeploySpec(image="i", etcd="etcd://10.0.0.2:2379"), SECRET)
    _validate(objects)
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    for c in _containers(objects):
        assert _flag(c, "--discovery") == "etcd://10.0.0.2:2379"
        assert _flag(c, "--namespace") == "splitserve"


def test_an_external_etcd_with_tls_and_a_password_gets_flags_mounts_and_env_from_secrets(capsys):
    assert main(["deploy", "kubernetes", "--image", "i", "--etcd", "etcd://etcd.example:2379",
                 "--etcd-tls-secret", "etcd-client-tls", "--etcd-client-cert",
                 "--etcd-user", "splitserve", "--etcd-password-secret", "etcd-password",
                 "--engine", "vllm", "--tensor-parallel-size", "2", "--nodes-per-worker", "2"]) == 0
    objects = list(yaml.safe_load_all(capsys.readouterr().out))
    _validate(objects)
    serving = [c for c in _containers(objects) if "--discovery" in _argv(c)]
    assert sorted(c["name"] for c in serving) == ["decode", "frontend", "prefill"]
    pods = {c["name"]: pod for obj in objects for pod in _pod_specs(obj)
            for c in pod["containers"]}
    parser = build_parser()
    for c in serving:
        # The flags name the files where the Secret is mounted, as the CLI reads them
        # (known args only: --engine vllm belongs to the vLLM backend's own work).
        args, _ = parser.parse_known_args(_argv(c)[_argv(c).index("splitserve") + 1:])
        assert (args.etcd_cacert, args.etcd_cert, args.etcd_key, args.etcd_user) == (
            "/etc/splitserve/etcd/ca.crt", "/etc/splitserve/etcd/tls.crt",
            "/etc/splitserve/etcd/tls.key", "splitserve")
        assert {"name": "etcd-tls", "mountPath": "/etc/splitserve/etcd", "readOnly": True} in \
            c["volumeMounts"]
        [volume] = [v for v in pods[c["name"]]["volumes"] if v["name"] == "etcd-tls"]
        assert volume["secret"] == {"secretName": "etcd-client-tls", "items": [
            {"key": k, "path": k} for k in ("ca.crt", "tls.crt", "tls.key")]}
        # The password only from its Secret, never on a command line.
        assert {"name": "SPLITSERVE_ETCD_PASSWORD", "valueFrom": {"secretKeyRef": {
            "name": "etcd-password", "key": "password"}}} in c["env"]
        assert not any("password" in a.lower() for a in _argv(c))
    # Only the CA without a client certificate: no --etcd-cert, and only ca.crt mounted.
    objects = render_objects(DeploySpec(image="i", etcd="etcd://e:2379",
                                        etcd_tls_secret="etcd-ca"), SECRET)
    _validate(objects)
    for c in _containers(objects):
        assert _flag(c, "--etcd-cacert") == "/etc/splitserve/etcd/ca.crt"
        assert "--etcd-cert" not in _argv(c) and "--etcd-user" not in _argv(c)


@pytest.mark.parametrize("fields, message", [
    ({"image": ""}, "image must be"),
    ({"name": "Bad_Name"}, "name must be a DNS label"),
    ({"namespace": "a b"}, "namespace must be a DNS label"),
    ({"model_pvc": "m"}, "give model, the checkpoint directory"),
    ({"model_pvc": "m", "model_host_path": "/m", "model": "/models/x"}, "not both"),
    ({"model_host_path": "/data", "model": "/data/x"}, "is not under /models"),
    ({"prefill": 0}, "prefill must be 1..1000"),
    ({"engine": "tgi"}, "engine must be one of"),
    ({"tensor_parallel_size": 2}, "engine 'splitserve' runs on one device"),
    ({"engine": "vllm", "device": "cpu"}, "engine 'vllm' runs on GPUs"),
    ({"engine": "vllm", "tensor_parallel_size": 3, "nodes_per_worker": 2}, "must be a multiple"),
    ({"worker_port": 8000}, "worker_port and frontend_port are both 8000"),
    ({"kv_port": 70000}, "kv_port must be 1..65535"),
    ({"engine": "vllm", "tensor_parallel_size": 2, "nodes_per_worker": 2, "kv_port": 6379},
     "Ray's port and kv_port are both 6379"),
    ({"etcd": "http://10.0.0.2:2379"}, "etcd must be an etcd://HOST:PORT URL"),
    ({"etcd": "etcd://:2379"}, "etcd: discovery URL"),
    ({"etcd_tls_secret": "tls"}, "etcd_tls_secret apply to an external etcd"),
    ({"etcd": "etcd://e:2379", "etcd_client_cert": True}, "etcd_client_cert needs etcd_tls_secret"),
    ({"etcd": "etcd://e:2379", "etcd_user": "u"}, "etcd_user and etcd_password_secret go together"),
    ({"etcd": "etcd://e:2379", "etcd_user": "a b", "etcd_password_secret": "p"},
     "etcd_user must be a non-empty name"),
    ({"etcd": "etcd://e:2379", "etcd_tls_secret": "Bad_Name"}, "etcd_tls_secret must be a DNS"),
    ({"worker_args": ("--etcd-user", "root")}, "must not set --etcd-user"),
    ({"startup_budget_s": 0}, "startup_budget_s must be"),
    ({"gpu_resource": "gpu"}, "gpu_resource must be"),
    ({"worker_args": ("--max-model-len", "8192", "--kv-secret=x")}, "must not set --kv-secret"),
])
def test_bad_specs_are_refused_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
        DeploySpec(**{"image": "i", **fields})


def test_bad_flags_are_usage_errors_naming_the_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["deploy", "kubernetes", "--image", "i", "--frontend-port", "8100"])
    assert e.value.code == 2
    assert "worker_port and frontend_port are both 8100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["deploy", "kubernetes"])
    assert e.value.code == 2 and "--image" in capsys.readouterr().err


def test_extra_worker_flags_are_passed_to_every_worker():
    objects = render_objects(DeploySpec(image="i", worker_args=("--max-model-len", "8192")), SECRET)
    workers = [c for c in _containers(objects) if "worker" in _argv(c)]
    assert len(workers) == 2 and all(_flag(c, "--max-model-len") == "8192" for c in workers)


def test_every_rendered_command_line_is_one_the_cli_accepts():
    spec = DeploySpec(image="i", model_host_path="/data", model="/models/m", device="cuda",
                      served_model_name="m", worker_args=("--max-model-len", "8192"))
    parser = build_parser()
    commands = [c for c in _containers(render_objects(spec, SECRET)) if c["name"] != "etcd"]
    assert len(commands) == 3
    for c in commands:
        assert c["command"] == ["splitserve"]
        args = parser.parse_args(c["args"])
        # Each process validates its own flags the way it does at start-up.
        if args.command == "worker":
            worker_config_from_args(args.parser, args)
            assert engine_config_from_args(args.parser, args).max_model_len == 8192
        assert discovery_from_args(args.parser, args).config.namespace == "splitserve"


def test_the_yaml_is_plain_no_anchors_or_aliases(capsys):
    assert main(["deploy", "kubernetes", "--image", "i", "--engine", "vllm",
                 "--tensor-parallel-size", "4", "--nodes-per-worker", "2"]) == 0
    text = capsys.readouterr().out
    assert "&id" not in text and "*id" not in text
    _validate(list(yaml.safe_load_all(text)))
