"""Doctor's P→D bandwidth check: the prefill worker opens a probe KV server, the decode
worker fetches a few hundred MB of synthetic blocks through the real protocol
(splitserve/transfer/bandwidth.py), and from the rate comes the time the KV of the
longest allowed prompt takes on that link, against the decode worker's
--kv-stall-timeout and the prefill worker's --kv-lease. Slower than either is a warning
(!): the lease is renewed by ACKs, so the transfer survives, but with no margin."""

from __future__ import annotations

import httpx

from splitserve.doctor.deployment import TIMEOUT_S, Worker, bearer
from splitserve.doctor.report import Check

FIX = {
    "bandwidth": "The KV of the longest allowed prompt takes longer on this link than the "
                 "decode worker's --kv-stall-timeout or the prefill worker's --kv-lease: one "
                 "lost ACK or a pause leaves no margin. Raise both above the transfer time, "
                 "use a faster link between these hosts, or lower --max-model-len.",
    "probe": "The bandwidth probe could not run: the probe server listens on another port "
             "than the KV port (a firewall that opens only the KV port blocks it); the "
             "session check above tells whether the KV port itself works.",
}


def check_bandwidth(d: Worker, p: Worker, secret: str | None, nbytes: int) -> Check:
    """P opens a probe KV server, D fetches `nbytes` through the real protocol; the rate
    gives the time the longest allowed prompt's KV takes on this pair's link."""
    subject = f"prefill {p.id} -> decode {d.id}"
    title = "P→D bandwidth through the KV protocol"
    try:
        r = httpx.post(f"{p.api_url}/doctor/kv_probe_server", timeout=60.0, headers=bearer(secret))
        r.raise_for_status()
        server = r.json()
        try:
            body = {"target": {"worker_id": p.id, "kv_host": p.kv_host, "kv_port": p.kv_port},
                    "probe_port": server["probe_port"], "block_shape": server["block_shape"],
                    "dtype": server["dtype"], "bytes": nbytes}
            m = httpx.post(f"{d.api_url}/doctor/kv_bandwidth", json=body, timeout=600.0,
                           headers=bearer(secret))
            m.raise_for_status()
            result = m.json()
        finally:
            httpx.delete(f"{p.api_url}/doctor/kv_probe_server/{server['probe_port']}",
                         timeout=TIMEOUT_S, headers=bearer(secret))
    except httpx.HTTPError as e:
        return Check("bandwidth", title, "fail", subject, (f"{e!r}",), FIX["probe"])
    if result["outcome"] != "ok":
        return Check("bandwidth", title, "fail", subject,
                     (f"{result['outcome']}: {result['reason']}",), FIX["probe"],
                     data={"bandwidth": result})
    rate = result["bytes_per_s"]
    blocks = -(-server["max_model_len"] // server["block_size"])
    kv_bytes = blocks * _block_nbytes(server)
    seconds = kv_bytes / rate
    limit = min(result["stall_timeout"], server["lease"])
    summary = (f"{rate / 1e6:.0f} MB/s over {result['transport']}: the KV of the longest "
               f"prompt ({server['max_model_len']} tokens, {kv_bytes / 1e6:.1f} MB) takes "
               f"{seconds:.2f}s (kv stall timeout {result['stall_timeout']:g}s, kv lease "
               f"{server['lease']:g}s)")
    data = {"bandwidth": {**result, "longest_prompt_tokens": server["max_model_len"],
                          "longest_prompt_kv_bytes": kv_bytes, "longest_prompt_seconds": seconds,
                          "block_bytes": _block_nbytes(server)}}
    if seconds < limit:
        return Check("bandwidth", f"{title}: {summary}", "ok", subject, data=data)
    return Check("bandwidth", title, "warn", subject, (summary,), FIX["bandwidth"], data=data)


def _block_nbytes(server: dict) -> int:
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[server["dtype"]]
    n = 1
    for d in server["block_shape"]:
        n *= d
    return n * size
