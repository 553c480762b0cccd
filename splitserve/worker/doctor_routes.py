"""The worker routes `splitserve doctor` asks (behind the worker API's secret, like every
route but the probes and metrics).

GET /incidents: this worker's recent transfer incidents (incidents.py) — fallbacks by
reason, resumes and checksum re-sends on a decode worker, lease expiries on a prefill
worker — each with its request id, peer and time.

POST /doctor/kv_session (decode and both roles), body a PrefillTarget: this worker opens
a KV session to that prefill worker — handshake only (transfer/probe.py) — and answers
what happened: ok, unreachable, auth_failed (secrets differ), mismatch (fingerprints or
versions differ). The target must be a prefill worker this worker knows (discovery or
--kv-peers), exactly as for /generate, so the route dials nothing a stranger names.

Bandwidth (transfer/bandwidth.py): POST /doctor/kv_probe_server on a prefill worker opens
a short-lived KV server over scratch blocks shaped like its own (DELETE
/doctor/kv_probe_server/{port} closes it; it closes itself after a while anyway); POST
/doctor/kv_bandwidth on a decode worker fetches from it and answers the measured rate
with its own --kv-stall-timeout. The probe server's host is the prefill worker's known
KV host: only the port comes from the caller.

A vLLM worker's KV is in vLLM's processes, one shard per tensor-parallel rank: its probes
use what each rank's connector wrote about its KV (ConnectorEngine.kv_ranks): the session
probe runs the handshake rank to rank (rank r of the decode worker to kv_port + r), the
probe server's blocks are the size of one rank's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math

import msgspec
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from splitserve.transfer.bandwidth import ProbeServer, measure
from splitserve.transfer.probe import SessionProbe, probe_session
from splitserve.worker import protocol as p
from splitserve.worker.engine_api import WorkerEngine
from splitserve.worker.config import WorkerConfig
from splitserve.worker.incidents import IncidentLog
from splitserve.worker.prefill_peers import PrefillPeers, UnknownPrefillWorker
from splitserve.worker.vllm_disagg import ConnectorEngine


def add_doctor_routes(app: FastAPI, worker_id: str, config: WorkerConfig, incidents: IncidentLog,
                      engine: WorkerEngine, peers: PrefillPeers) -> None:
    @app.get("/incidents")
    async def get_incidents() -> JSONResponse:
        return JSONResponse({"worker_id": worker_id, "role": config.role, **incidents.snapshot()})

    if config.role == "prefill":
        _add_probe_server_routes(app, config, engine)
        return

    @app.post("/doctor/kv_session")
    async def kv_session(request: Request) -> JSONResponse:
        try:
            target = p.decode(await request.body(), p.PrefillTarget)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return JSONResponse({"message": f"invalid prefill target: {e}"}, status_code=400)
        shards = _kv_shards(engine)
        if not shards:
            return JSONResponse({"message": "the model is not loaded yet"}, status_code=503)
        try:
            addr = await peers.resolve("doctor-session-probe", target)
        except UnknownPrefillWorker as e:
            return JSONResponse({"message": str(e), "code": "unknown_prefill_worker"},
                                status_code=400)
        probe = await asyncio.to_thread(_probe_ranks, addr, shards, config)
        return JSONResponse({"decode_worker": worker_id, "prefill_worker": target.worker_id,
                             "kv_address": f"{addr[0]}:{addr[1]}", **probe.to_json()})

    @app.post("/doctor/kv_bandwidth")
    async def kv_bandwidth(request: Request) -> JSONResponse:
        try:
            body = msgspec.json.decode(await request.body(), type=_BandwidthRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            return JSONResponse({"message": f"invalid bandwidth request: {e}"}, status_code=400)
        try:
            host, _ = await peers.resolve("doctor-bandwidth-probe", body.target)
        except UnknownPrefillWorker as e:
            return JSONResponse({"message": str(e), "code": "unknown_prefill_worker"},
                                status_code=400)
        result = await asyncio.to_thread(measure, (host, body.probe_port), body.block_shape,
                                         body.dtype, config.transfer, body.bytes,
                                         f"doctor-bandwidth-{worker_id}")
        return JSONResponse({**result, "stall_timeout": config.transfer.stall_timeout})


def _kv_shards(engine: WorkerEngine) -> list[tuple[torch.Tensor | None, dict[str, str]]]:
    """(KV tensor, fingerprint) per tensor-parallel rank: our engine's one, or each of a
    vLLM worker's ranks (no tensor here: the handshake reads none); [] before the KV."""
    kv = engine.kv_memory()
    if kv is not None:
        return [(kv.tensor, kv.fingerprint)]
    if isinstance(engine, ConnectorEngine):
        return [(None, rank["fingerprint"]) for rank in engine.kv_ranks()]
    return []


def _probe_ranks(addr: tuple[str, int], shards: list, config: WorkerConfig) -> SessionProbe:
    """The handshake from each rank to the prefill worker's same rank (kv_port + r); the
    first that fails is the answer."""
    for r, (tensor, fingerprint) in enumerate(shards):
        probe = probe_session((addr[0], addr[1] + r),
                              tensor if tensor is not None else _PLACEHOLDER_KV,
                              config.transfer, fingerprint)
        if not probe.ok:
            return probe if len(shards) == 1 else dataclasses.replace(
                probe, reason=f"TP rank {r} (port {addr[1] + r}): {probe.reason}")
    return probe if len(shards) == 1 else dataclasses.replace(
        probe, reason=f"{probe.reason}, on each of {len(shards)} TP ranks")


def _flat_block_shape(elements: int) -> list[int]:
    """A block shape (our engine's 5 dims, each at most 2**16) holding about `elements`:
    what one rank's block of a vLLM worker weighs on the wire (the probe measures a rate;
    its blocks need the size, not the meaning). Exact unless a prime factor is > 2**16."""
    inner = math.gcd(elements, 1 << 16)
    return [1, 1, 1, -(-elements // inner), inner] if elements // inner <= 1 << 16 else \
        [1, 1, 1, -(-elements // (1 << 16)), 1 << 16]


# The handshake never touches a block: one placeholder for a worker whose KV is elsewhere.
_PLACEHOLDER_KV = torch.zeros(1, 1, 2, 1, 1, 1)


class _BandwidthRequest(msgspec.Struct, forbid_unknown_fields=True):
    target: p.PrefillTarget
    probe_port: int
    block_shape: list[int]
    dtype: str
    bytes: int

    def __post_init__(self):
        if not 0 < self.probe_port < 65536 or self.bytes <= 0 or self.dtype not in _DTYPES:
            raise ValueError("probe_port in 1..65535, bytes > 0, dtype one of " + str(_DTYPES))
        if not self.block_shape or not all(0 < d <= 1 << 16 for d in self.block_shape):
            raise ValueError("block_shape must be positive dimensions")


_DTYPES = ("float32", "float16", "bfloat16")


def _add_probe_server_routes(app: FastAPI, config: WorkerConfig, engine: WorkerEngine) -> None:
    servers: dict[int, ProbeServer] = {}

    @app.post("/doctor/kv_probe_server")
    async def open_probe_server() -> JSONResponse:
        kv, info = engine.kv_memory(), engine.info()
        if kv is not None:
            shape, dtype = kv.block_shape, kv.dtype
        elif isinstance(engine, ConnectorEngine) and engine.kv_ranks():
            rank = engine.kv_ranks()[0]
            dtype = rank["dtype"]
            shape = _flat_block_shape(rank["block_nbytes"] * 8 //
                                      torch.finfo(getattr(torch, dtype)).bits)
        else:
            return JSONResponse({"message": "the model is not loaded yet"}, status_code=503)
        if info is None:
            return JSONResponse({"message": "the model is not loaded yet"}, status_code=503)
        server = await asyncio.to_thread(ProbeServer, shape, dtype, config.transfer, config.host)
        servers[server.port] = server
        return JSONResponse({"probe_port": server.port, "block_shape": shape, "dtype": dtype,
                             "block_size": info.block_size,
                             "max_model_len": info.max_model_len,
                             "lease": config.transfer.lease})

    @app.delete("/doctor/kv_probe_server/{port}")
    async def close_probe_server(port: int) -> JSONResponse:
        server = servers.pop(port, None)
        if server is not None:
            await asyncio.to_thread(server.close)
        return JSONResponse({"closed": server is not None})
