"""`splitserve doctor --frontend URL | --discovery URL`: ask a running deployment what is
wrong, naming the worker and the address of each ✘.

Checks, in order: workers are listed (the frontend's /cluster or discovery itself); each
is reachable and healthy; no worker advertises a "this machine" address while others
are elsewhere; each decode worker opens a KV session (handshake only) to each prefill
worker — the decode worker does it, from where the KV really flows, so secrets and
fingerprints are compared by the real protocol; each worker's recent transfer incidents
(with request ids); and a prompt's exact token count against the context limit. The
P→D bandwidth check is in bandwidth.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx

from splitserve.doctor.report import Check

if TYPE_CHECKING:
    from splitserve.discovery import Discovery

TIMEOUT_S = 10.0
# What a process advertises when it was not told its address: 127.0.0.1 / ::1, or the
# hostname, which Debian maps to 127.0.1.1. Other 127.x addresses are only ever chosen on
# purpose (tests stand two "hosts" up as 127.0.0.2 and 127.0.0.3).
_THIS_MACHINE = {ipaddress.ip_address(a) for a in ("127.0.0.1", "127.0.1.1", "::1")}
_INCIDENT_FAILS = {"fallback", "lease_expired"}     # resumes and re-sends recovered
_SHOWN_INCIDENTS = 10

FIX = {
    "workers": "Start at least one decode (or both) worker registered in the same discovery "
               "as the frontend; `splitserve worker --discovery URL`.",
    "reachable": "Check the process runs, listens on the advertised address and port "
                 "(--host / --advertise-host), and that no firewall blocks it; its log names "
                 "why it is not ready.",
    "advertised": "Start the worker with --advertise-host set to an address the other hosts "
                  "can reach (the pod IP under Kubernetes), not a loopback address.",
    "unreachable": "The prefill worker's advertised KV address cannot be reached from the "
                   "decode worker: check --advertise-host and --kv-port on the prefill worker "
                   "and that the port is open between the two hosts.",
    "auth_failed": "The two workers hold different secrets: give every process the same "
                   "SPLITSERVE_KV_SECRET (or --kv-secret).",
    "mismatch": "Prefill and decode serve different models or KV layouts (or versions): start "
                "both roles with the same --model, --dtype and splitserve version.",
    "unauthorized": "Doctor's secret is not the worker's: pass the deployment's secret with "
                    "--kv-secret or $SPLITSERVE_KV_SECRET (or the worker has another one).",
    "incidents": "Fallbacks compute prompts twice; the reason names the cause (peer_dead: "
                 "prefill unreachable or restarted; stalled/busy: prefill overloaded; "
                 "auth_failed/mismatch: see the KV session checks). Lease expiries: the "
                 "decode worker went silent for longer than --kv-lease.",
    "context": "Shorten the prompt or serve the model with a longer --max-model-len; the count "
               "includes the chat template.",
}


@dataclass(frozen=True)
class Worker:
    id: str
    role: str
    api_url: str
    kv_host: str | None
    kv_port: int | None

    @property
    def subject(self) -> str:
        return f"{self.role} worker {self.id} at {self.api_url}"


def list_from_frontend(url: str, api_key: str | None) -> list[Worker]:
    r = httpx.get(f"{url.rstrip('/')}/cluster", timeout=TIMEOUT_S, headers=bearer(api_key))
    r.raise_for_status()
    workers = []
    for w in r.json()["workers"]:
        host, port = (w["kv_address"].rsplit(":", 1) if w.get("kv_address") else (None, None))
        workers.append(Worker(w["id"], w["role"], w["api_url"],
                              host.strip("[]") if host else None, int(port) if port else None))
    return workers


def list_from_discovery(discovery: Discovery) -> list[Worker]:
    async def records():
        async with discovery as d:
            return await d.list()
    return [Worker(r.worker_id, r.role, r.api_url, r.kv_host, r.kv_port)
            for r in asyncio.run(records())]


def bearer(secret: str | None) -> dict[str, str]:
    return {} if secret is None else {"authorization": f"Bearer {secret}"}


def _host_of(worker: Worker) -> str:
    return urlsplit(worker.api_url).hostname or ""


def _this_machine(host: str) -> bool:
    try:
        return any(ipaddress.ip_address(i[4][0].split("%")[0]) in _THIS_MACHINE
                   for i in socket.getaddrinfo(host, None))
    except (socket.gaierror, ValueError):
        return False


def check_listed(workers: list[Worker], source: str) -> Check:
    roles = sorted(w.role for w in workers)
    summary = ", ".join(f"{roles.count(r)} {r}" for r in dict.fromkeys(roles)) or "none"
    if not any(w.role in ("decode", "both") for w in workers):
        return Check("workers", f"workers listed by {source}", "fail",
                     details=(f"workers: {summary}; no decode worker serves requests",),
                     fix=FIX["workers"])
    return Check("workers", f"workers listed by {source}: {summary}", "ok")


def check_reachable(w: Worker, secret: str | None) -> tuple[Check, dict | None]:
    """(the check, the worker's /info when it answered)."""
    try:
        health = httpx.get(f"{w.api_url}/health", timeout=TIMEOUT_S)
    except httpx.HTTPError as e:
        return Check("reachable", "worker reachable", "fail", w.subject,
                     (f"GET {w.api_url}/health: {e!r}",), FIX["reachable"]), None
    if health.status_code != 200:
        return Check("reachable", "worker reachable", "fail", w.subject,
                     (f"/health answered {health.status_code}: {health.text[:300]}",),
                     FIX["reachable"]), None
    try:
        info = httpx.get(f"{w.api_url}/info", timeout=TIMEOUT_S, headers=bearer(secret))
    except httpx.HTTPError as e:
        return Check("reachable", "worker reachable", "fail", w.subject,
                     (f"GET {w.api_url}/info: {e!r}",), FIX["reachable"]), None
    if info.status_code == 401:
        return Check("reachable", "worker reachable", "fail", w.subject,
                     ("the worker refuses doctor's secret (401)",), FIX["unauthorized"]), None
    if info.status_code != 200:
        return Check("reachable", "worker reachable", "fail", w.subject,
                     (f"/info answered {info.status_code}: {info.text[:300]}",),
                     FIX["reachable"]), None
    return Check("reachable", "worker reachable and ready", "ok", w.subject), info.json()


def check_advertised(w: Worker, workers: list[Worker]) -> Check:
    others = {_host_of(o) for o in workers if o is not w} - {_host_of(w)}
    named = [(what, host) for what, host in (("API", _host_of(w)), ("KV", w.kv_host)) if host]
    bad = [f"{what} address {host}" for what, host in named if _this_machine(host)]
    if bad and others:
        return Check("advertised", "advertised addresses usable by the other workers", "fail",
                     w.subject, (f"advertises {' and '.join(bad)} (this machine only) while "
                                 f"other workers are on {', '.join(sorted(others))}",),
                     FIX["advertised"])
    if w.role == "prefill" and not w.kv_host:
        return Check("advertised", "advertised addresses usable by the other workers", "fail",
                     w.subject, ("a prefill worker with no KV address: decode workers cannot "
                                 "fetch from it (still loading, or its KV port failed)",),
                     FIX["reachable"])
    return Check("advertised", "advertised addresses usable by the other workers", "ok",
                 w.subject)


def check_kv_session(d: Worker, p: Worker, secret: str | None) -> Check:
    title = "KV session (handshake from the decode worker)"
    subject = f"decode {d.id} -> prefill {p.id} at {p.kv_host}:{p.kv_port}"
    body = {"worker_id": p.id, "kv_host": p.kv_host, "kv_port": p.kv_port}
    try:
        r = httpx.post(f"{d.api_url}/doctor/kv_session", json=body, timeout=60.0,
                       headers=bearer(secret))
    except httpx.HTTPError as e:
        return Check("kv_session", title, "fail", subject, (f"decode worker: {e!r}",),
                     FIX["reachable"])
    if r.status_code != 200:
        return Check("kv_session", title, "fail", subject,
                     (f"decode worker answered {r.status_code}: {r.text[:300]}",),
                     FIX["unauthorized"] if r.status_code == 401 else FIX["reachable"])
    probe = r.json()
    if probe["outcome"] == "ok":
        return Check("kv_session", title, "ok", subject, data={"probe": probe})
    return Check("kv_session", title, "fail", subject,
                 (f"{probe['outcome']}: {probe['reason']}",),
                 FIX.get(probe["outcome"], FIX["unreachable"]), data={"probe": probe})


def check_incidents(w: Worker, secret: str | None) -> Check:
    title = "recent KV transfer incidents"
    try:
        r = httpx.get(f"{w.api_url}/incidents", timeout=TIMEOUT_S, headers=bearer(secret))
        r.raise_for_status()
    except httpx.HTTPError as e:
        return Check("incidents", title, "fail", w.subject, (f"GET /incidents: {e!r}",),
                     FIX["reachable"])
    snap = r.json()
    recent = snap["recent"]
    if not recent:
        return Check("incidents", f"{title}: none", "ok", w.subject, data={"incidents": snap})
    lines = [", ".join(f"{k}: {v}" for k, v in sorted(snap["counts"].items()) if ":" in k)]
    for i in recent[-_SHOWN_INCIDENTS:]:
        at = datetime.fromtimestamp(i["time"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        peer = f" from {i['peer']}" if i["peer"] else ""
        lines.append(f"{at} {i['kind']} ({i['reason']}) request {i['request_id']}{peer}: "
                     f"{i['detail']}")
    failed = any(i["kind"] in _INCIDENT_FAILS for i in recent)
    return Check("incidents", title, "fail" if failed else "warn", w.subject, tuple(lines),
                 FIX["incidents"], data={"incidents": snap})


def check_prompt(tokens: int, limit: int, how: str) -> Check:
    title = f"prompt of {tokens} tokens ({how}) within the context limit of {limit}"
    if tokens < limit:
        return Check("context", title, "ok")
    return Check("context", "prompt over the context limit", "fail",
                 details=(f"{tokens} tokens ({how}) >= max_model_len {limit}: the frontend "
                          "refuses it (400)",), fix=FIX["context"])


def count_prompt_file(frontend: str, api_key: str | None, path: str) -> tuple[int, int]:
    """(tokens, max_model_len): the file as one user message, through the served model's
    tokenizer and chat template (the frontend's /tokenize, as /v1/chat/completions counts)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    r = httpx.post(f"{frontend.rstrip('/')}/tokenize", timeout=120.0, headers=bearer(api_key),
                   json={"messages": [{"role": "user", "content": text}]})
    r.raise_for_status()
    body = r.json()
    return body["count"], body["max_model_len"]


def diagnose(frontend: str | None, discovery: Discovery | None, secret: str | None,
             api_key: str | None, prompt_tokens: int | None = None,
             prompt_file: str | None = None, bandwidth_bytes: int = 0,
             discovery_url: str | None = None) -> list[Check]:
    """Every check against the deployment, in the order the module doc gives. discovery:
    the backend (as `discovery_from_args` builds it, etcd TLS and user included), used
    when frontend is None; discovery_url names it in the report."""
    source = f"frontend {frontend}" if frontend else f"discovery {discovery_url}"
    try:
        workers = (list_from_frontend(frontend, api_key) if frontend
                   else list_from_discovery(discovery))
    except Exception as e:   # any failure to list is the first ✘: nothing else can run
        return [Check("workers", f"workers listed by {source}", "fail",
                      details=(f"{type(e).__name__}: {e}",),
                      fix="Check the URL; with an API key set on the frontend pass --api-key.")]
    checks = [check_listed(workers, source)]
    infos = {}
    for w in workers:
        check, info = check_reachable(w, secret)
        checks.append(check)
        if info is not None:
            infos[w.id] = info
    checks += [check_advertised(w, workers) for w in workers]
    reachable = [w for w in workers if w.id in infos]
    for d in (w for w in reachable if w.role in ("decode", "both")):
        for p in (w for w in workers if w.role == "prefill" and w.kv_host):
            checks.append(check_kv_session(d, p, secret))
            if bandwidth_bytes and checks[-1].status == "ok":
                from splitserve.doctor.bandwidth import check_bandwidth
                checks.append(check_bandwidth(d, p, secret, bandwidth_bytes))
    checks += [check_incidents(w, secret) for w in reachable]
    if prompt_file is not None:
        if frontend is None:
            raise ValueError("--prompt-file needs --frontend: the frontend holds the tokenizer "
                             "and chat template")
        tokens, limit = count_prompt_file(frontend, api_key, prompt_file)
        checks.append(check_prompt(tokens, limit, f"{prompt_file} with the chat template"))
    elif prompt_tokens is not None and infos:
        limit = min(i["max_model_len"] for i in infos.values())
        checks.append(check_prompt(prompt_tokens, limit, "--prompt-tokens"))
    return checks
