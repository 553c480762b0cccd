"""`splitserve doctor --manifests DIR`: what `deploy kubernetes` renders is all ✔; a probe
port, a probe path or a Service targetPort edited by hand is named exactly, with its
object and container and the port the process really listens on; and a hand-written
manifest in the style of the reference deployment (probes and Service on 8000 while the
frontend listens on 8787) has each of its mismatches named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from splitserve.cli.main import main

FRONTEND = "Deployment splitserve-frontend, container frontend"
DECODE = "Deployment splitserve-decode, container decode"
PREFILL = "Deployment splitserve-prefill, container prefill"


def doctor(capsys, directory: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["doctor", "--manifests", str(directory), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out)


def failed(report: dict) -> list[tuple[str, str]]:
    return sorted((c["id"], c["subject"]) for c in report["checks"] if c["status"] == "fail")


def render(tmp_path: Path, capsys, *flags: str) -> Path:
    out = tmp_path / "manifests"
    assert main(["deploy", "kubernetes", "--image", "splitserve:test", "--out", str(out),
                 *flags]) == 0
    capsys.readouterr()
    return out


def edit(directory: Path, suffix: str, change) -> None:
    """Rewrite the one file whose name ends with suffix after change(obj)."""
    [path] = directory.glob(f"*{suffix}")
    obj = yaml.safe_load(path.read_text())
    change(obj)
    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def container(obj: dict) -> dict:
    [c] = obj["spec"]["template"]["spec"]["containers"]
    return c


@pytest.mark.parametrize("flags", [(), ("--frontend-port", "8787", "--prefill", "2"),
                                   ("--engine", "vllm", "--tensor-parallel-size", "4",
                                    "--nodes-per-worker", "2")])
def test_rendered_manifests_are_all_green(tmp_path, capsys, flags):
    rc, report = doctor(capsys, render(tmp_path, capsys, *flags))
    assert rc == 0 and report["ok"], failed(report)
    subjects = {c["subject"] for c in report["checks"]}
    assert "Service splitserve-frontend" in subjects and FRONTEND in subjects
    assert sum("container prefill" in s or "container decode" in s for s in subjects) == 2


@pytest.mark.parametrize("suffix, change, expected, detail, fix", [
    ("deployment-splitserve-decode.yaml",
     lambda o: container(o)["readinessProbe"]["httpGet"].update(port=8101),
     ("probe_port", DECODE), "readinessProbe GETs port 8101", "httpGet.port to 8100"),
    ("deployment-splitserve-prefill.yaml",
     lambda o: container(o)["livenessProbe"]["httpGet"].update(path="/health"),
     ("probe_path", PREFILL), "livenessProbe GETs /health", "livenessProbe.httpGet.path to /live"),
    ("service-splitserve-frontend.yaml",
     lambda o: o["spec"]["ports"][0].update(targetPort=8080),
     ("service_port", "Service splitserve-frontend"), "forwards to targetPort 8080",
     "targetPort to 8000"),
], ids=["probe-port", "probe-path", "service-target-port"])
def test_one_edit_is_named_exactly(tmp_path, capsys, suffix, change, expected, detail, fix):
    out = render(tmp_path, capsys)
    edit(out, suffix, change)
    rc, report = doctor(capsys, out)
    assert rc == 1 and failed(report) == [expected]
    [bad] = [c for c in report["checks"] if c["status"] == "fail"]
    assert detail in bad["details"][0] and fix in bad["fix"]


REFERENCE_STYLE = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: llm-frontend
spec:
  selector:
    matchLabels: {app: llm-frontend}
  template:
    metadata:
      labels: {app: llm-frontend}
    spec:
      containers:
      - name: api
        image: registry.example.com/splitserve:1
        command: ["/bin/sh", "-c", "exec splitserve frontend --host 0.0.0.0 --port 8787 --discovery etcd://etcd:2379"]
        ports:
        - {name: http, containerPort: 8000}
        readinessProbe:
          httpGet: {path: /health, port: http}
        livenessProbe:
          httpGet: {path: /health, port: 8000}
---
apiVersion: v1
kind: Service
metadata:
  name: llm
spec:
  selector: {app: llm-frontend}
  ports:
  - {port: 80, targetPort: 8000}
"""


def test_a_hand_written_manifest_probing_8000_while_the_frontend_listens_on_8787(tmp_path, capsys):
    (tmp_path / "frontend.yaml").write_text(REFERENCE_STYLE)
    subject = "Deployment llm-frontend, container api"
    rc, report = doctor(capsys, tmp_path)
    assert rc == 1
    assert failed(report) == sorted([("container_port", subject), ("probe_port", subject),
                                     ("probe_port", subject), ("probe_path", subject),
                                     ("service_port", "Service llm")])
    details = [c["details"][0] for c in report["checks"] if c["status"] == "fail"]
    assert "readinessProbe GETs port http (named port 'http' is 8000), but `splitserve " \
           "frontend` listens on 8787 (--port)" in details
    assert "livenessProbe GETs /health; `splitserve frontend` serves readiness on /health and " \
           "liveness on /live" in details
    # The table a person reads: each ✘ with its fix, exit status 1.
    assert main(["doctor", "--manifests", str(tmp_path)]) == 1
    text = capsys.readouterr().out
    assert "✘ Service targetPort is a port the selected containers listen on — Service llm" in text
    assert "fix: Set readinessProbe.httpGet.port to 8787" in text


def test_a_container_on_a_random_port_or_a_bad_command_line_is_named(tmp_path, capsys):
    doc = yaml.safe_load(REFERENCE_STYLE.split("---")[0])
    c = doc["spec"]["template"]["spec"]["containers"][0]
    c["command"] = ["splitserve", "worker", "--role", "decode"]       # --port defaults to 0
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc))
    doc["metadata"]["name"] = "typo"
    c["command"] = ["splitserve", "worker", "--role", "decoder"]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    rc, report = doctor(capsys, tmp_path)
    assert rc == 1
    by = {(c["id"], c["subject"]): c for c in report["checks"] if c["status"] == "fail"}
    [random_port] = by[("probe_port", "Deployment llm-frontend, container api")]["details"]
    assert "random port" in random_port
    [refused] = by[("manifest", "Deployment typo, container api")]["details"]
    assert "invalid choice: 'decoder'" in refused


def test_a_directory_that_cannot_be_read_is_exit_status_2(tmp_path, capsys):
    assert main(["doctor", "--manifests", str(tmp_path / "missing")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_missing_readiness_probe_is_a_warning_not_a_failure(tmp_path, capsys):
    out = render(tmp_path, capsys)
    edit(out, "deployment-splitserve-decode.yaml", lambda o: container(o).pop("readinessProbe"))
    rc, report = doctor(capsys, out)
    [warn] = [c for c in report["checks"] if c["status"] == "warn"]
    assert rc == 0 and (warn["id"], warn["subject"]) == ("probe_missing", DECODE)
    assert "readinessProbe httpGet /health on port 8100" in warn["fix"]


@pytest.mark.parametrize("argv, message", [
    ([], "give --frontend URL, --discovery URL or --manifests DIR"),
    (["--frontend", "http://127.0.0.1:9", "--discovery", "file:/nonexistent"], "not both"),
    (["--frontend", "http://127.0.0.1:9", "--etcd-user", "root"], "apply to etcd discovery"),
])
def test_doctor_without_one_clear_target_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["doctor", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
