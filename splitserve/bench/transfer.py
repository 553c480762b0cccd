"""`splitserve bench transfer`: the KV data plane against its ceilings, same run, same bytes.

Synthetic KV shaped like one TP8 rank of Llama-3-70B (80 layers, 1 KV head per rank,
head_dim 128, bf16, block 128 tokens = 5 MiB per block) for 131,072 tokens (~5.4 GB),
streamed from a P process to a D process. Memory stays bounded: each side holds a pool
of `--pool-mib` and logical block i lives in pool block i % pool (P's bytes never change,
so every frame still verifies end to end).

Measured per repeat, in this order so background noise hits all of them alike:
  socket  - ceiling for tcp: a plain loopback sendall/recv_into blast of the same bytes,
            same socket options, no protocol, no checksum
  tcp     - the real protocol (handshake, PREFILL, BLOCKS + xxh3, ACKs) over tcp
  memcpy  - ceiling for shm: one torch copy_ of the same bytes, block by block, 1 thread
  shm     - the real protocol over shm, P's KV allocated with allocate_shared_kv: D copies
            straight out of P's KV (one copy)
  shm-ring - the same with P's KV in private memory: staged through a ring (two copies,
            one per process)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import struct
import threading
import time

import torch

from splitserve.bench.report import machine, median, print_table, write_json
from splitserve.transfer import (KVTransferServer, PrefillRequest, TransferConfig, fetch_kv,
                                 kv_fingerprint)
from splitserve.sampling_params import SamplingParams
from splitserve.transfer.handshake import tune_socket
from splitserve.transfer.kvmem import KVBlocks
from splitserve.transfer.shmfile import allocate_shared_kv, free_shared_kv
from splitserve.transfer.synthetic import SyntheticBackend

PATHS = ("socket", "tcp", "memcpy", "shm", "shm-ring")
CEILING = {"tcp": "socket", "shm": "memcpy", "shm-ring": "memcpy"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=131072, help="prompt length to transfer")
    p.add_argument("--layers", type=int, default=80)
    p.add_argument("--kv-heads", type=int, default=1, help="KV heads per TP rank")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--pool-mib", type=int, default=512, help="KV pool on each side")
    p.add_argument("--repeats", type=int, default=3, help="runs per path; medians reported")
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)}")
    p.add_argument("--json", help="write results to this path")


def _shape(args) -> tuple[int, ...]:
    return (args.layers, 2, args.block_size, args.kv_heads, args.head_dim)


def _pool_shape(shape, pool_mib: int) -> tuple[int, ...]:
    block_nbytes = 2 * torch.Size(shape).numel()   # bf16
    return (max(1, (pool_mib << 20) // block_nbytes), *shape)


def _pool(shape, pool_mib: int) -> torch.Tensor:
    return torch.zeros(_pool_shape(shape, pool_mib), dtype=torch.bfloat16)


def _server(kv: torch.Tensor, config: TransferConfig) -> KVTransferServer:
    """A KV server whose synthetic prefill has every block ready at once."""
    g = torch.Generator().manual_seed(0)
    flat = kv.view(kv.shape[0], -1).view(torch.uint8)
    for b in range(kv.shape[0]):   # random bytes: nothing compresses or short-cuts
        flat[b].copy_(torch.randint(0, 256, (flat.shape[1],), dtype=torch.uint8, generator=g))
    pool = kv.shape[0]
    backend = SyntheticBackend(kv, blocks_per_chunk=1 << 30, block_map=lambda i: i % pool)
    server = KVTransferServer(kv, kv_fingerprint(kv), config, backend)
    server.start()
    return server


def _prefill_main(conn, shape, pool_mib: int, config: TransferConfig, ring: bool) -> None:
    """P process: KV servers (shared KV; private KV for shm-ring) and a plain socket
    server for the ceiling."""
    torch.set_num_threads(1)
    kv = allocate_shared_kv(_pool_shape(shape, pool_mib), torch.bfloat16)
    blocks = KVBlocks(kv)
    pool = blocks.num_blocks
    servers = [_server(kv, config)]
    if ring:
        servers.append(_server(_pool(shape, pool_mib), config))
    blast = socket.create_server(("127.0.0.1", 0))

    def serve_blast():
        while True:
            try:
                s, _ = blast.accept()
            except OSError:
                return
            with s:
                tune_socket(s, config)
                (nblocks,) = struct.unpack("!Q", s.recv(8, socket.MSG_WAITALL))
                views = blocks.views(list(range(pool)))
                mem = views[0]
                nb = blocks.block_nbytes
                for i in range(nblocks):
                    b = i % pool
                    s.sendall(mem[b * nb:(b + 1) * nb])
                s.recv(1)   # D says it has everything

    threading.Thread(target=serve_blast, daemon=True).start()
    conn.send(([s.address for s in servers], blast.getsockname()[:2]))
    try:
        conn.recv()     # stop
    finally:
        blast.close()
        for s in servers:
            s.close()
        free_shared_kv(kv)


def _decode_main(conn, shape, pool_mib: int, config: TransferConfig, tokens: int) -> None:
    """D process: runs one measurement per command from the parent, returns seconds."""
    torch.set_num_threads(1)
    kv = _pool(shape, pool_mib)
    blocks = KVBlocks(kv)
    pool, nb = blocks.num_blocks, blocks.block_nbytes
    nblocks = -(-tokens // shape[2])
    dest = [i % pool for i in range(nblocks)]
    other = torch.zeros_like(kv)   # touched now, so memcpy does not time page faults
    fp = kv_fingerprint(kv)
    kv_addrs, blast_addr = conn.recv()
    n = 0
    while (path := conn.recv()) is not None:
        t0 = time.perf_counter()
        if path == "socket":
            with socket.create_connection(blast_addr) as s:
                tune_socket(s, config)
                s.sendall(struct.pack("!Q", nblocks))
                for i in range(nblocks):
                    view = blocks.mem[dest[i] * nb:(dest[i] + 1) * nb]
                    got = 0
                    while got < nb:
                        k = s.recv_into(view[got:], nb - got)
                        if k == 0:
                            raise ConnectionError("blast sender closed early")
                        got += k
                s.sendall(b"k")
            ok = True
        elif path == "memcpy":
            for i in range(nblocks):
                other[dest[i]].copy_(kv[dest[i]])
            ok = True
        else:
            n += 1
            req = PrefillRequest(f"bench-{path}-{n}", list(range(tokens)), SamplingParams(), nblocks)
            transport = path.removesuffix("-ring")
            cfg = TransferConfig(**{**_config_kwargs(config), "transport": transport})
            r = fetch_kv(kv_addrs[path == "shm-ring"], req, dest, kv, cfg, fp)
            ok = r.ok and r.transport == transport
            if not ok:
                print(f"{path}: transfer failed: {r.outcome.value}: {r.reason}", flush=True)
        conn.send((time.perf_counter() - t0, ok))


def _config_kwargs(c: TransferConfig) -> dict:
    return {f: getattr(c, f) for f in c.__dataclass_fields__}


def run(args) -> int:
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    shape = _shape(args)
    block_nbytes = 2 * torch.Size(shape).numel()
    nblocks = -(-args.tokens // args.block_size)
    total = nblocks * block_nbytes
    config = TransferConfig()
    info = machine()
    print(f"machine: {info}")
    print(f"KV: {nblocks} blocks x {block_nbytes / 2**20:.1f} MiB = {total / 1e9:.2f} GB "
          f"through {args.pool_mib} MiB pools; frame {config.frame_bytes >> 20} MiB, "
          f"socket buffers {config.socket_buffer >> 20} MiB requested")
    ctx = mp.get_context("spawn")
    p_conn, p_child = ctx.Pipe()
    d_conn, d_child = ctx.Pipe()
    prefill = ctx.Process(target=_prefill_main, daemon=True,
                          args=(p_child, shape, args.pool_mib, config, "shm-ring" in paths))
    decode = ctx.Process(target=_decode_main, args=(d_child, shape, args.pool_mib, config,
                                                    args.tokens), daemon=True)
    prefill.start()
    decode.start()
    samples: dict[str, list[float]] = {p: [] for p in paths}
    failed = False
    try:
        d_conn.send(p_conn.recv())
        for rep in range(-1, args.repeats):    # round -1 warms pools, rings and caches
            for path in paths:
                d_conn.send(path)
                seconds, ok = d_conn.recv()
                failed |= not ok
                if rep < 0:
                    continue
                samples[path].append(seconds)
                print(f"  {path:7s} {total / seconds / 1e9:6.2f} GB/s  ({seconds:.2f}s)", flush=True)
        d_conn.send(None)
    finally:
        p_conn.send(None)
        decode.join(timeout=30)
        prefill.join(timeout=30)
    rows, results = [], {"machine": info, "bytes": total, "blocks": nblocks,
                         "block_nbytes": block_nbytes, "pool_mib": args.pool_mib,
                         "repeats": args.repeats, "paths": {}}
    gbps = {p: total / median(s) / 1e9 for p, s in samples.items()}
    ceiling = CEILING
    for p, s in samples.items():
        ratio = gbps[p] / gbps[ceiling[p]] if ceiling.get(p) in gbps else None
        results["paths"][p] = {"seconds": s, "median_gbps": gbps[p], "ratio_to_ceiling": ratio}
        rows.append([p, gbps[p], total / max(s) / 1e9, total / min(s) / 1e9, median(s),
                     f"{ratio:.2f}x {ceiling[p]}" if ratio is not None else "ceiling"])
    print_table(["path", "median GB/s", "min GB/s", "max GB/s", "median s", "vs ceiling"], rows,
                title=f"\nKV transfer, {total / 1e9:.2f} GB, {args.repeats} repeats")
    write_json(args.json, results)
    return 1 if failed else 0
