"""etcd-specific discovery behaviour against a real etcd: leases that lapse while the
worker lives are granted again, watches and keep-alives survive an etcd restart, and
malformed keys under the prefix do not break a frontend."""

import asyncio
import socket
import time
import uuid

import aetcd
import pytest

from etcd_server import EtcdServer
from splitserve.discovery import DiscoveryError, EtcdDiscovery, EtcdDiscoveryConfig
from test_discovery_backends import MARGIN_S, Watcher, listed_ids, record

TTL_S = 2


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture
def config(etcd):
    return EtcdDiscoveryConfig(host=etcd.host, port=etcd.port,
                               namespace=f"test-{uuid.uuid4().hex[:8]}", ttl_s=TTL_S)


def key(config: EtcdDiscoveryConfig, worker_id: str) -> bytes:
    return f"/splitserve/{config.namespace}/workers/{worker_id}".encode()


def test_keys_live_under_the_namespace_prefix_with_a_lease(etcd, config):
    async def main():
        async with EtcdDiscovery(config) as worker, aetcd.Client(etcd.host, etcd.port) as raw:
            await worker.register(record("p0"))
            kv = await raw.get(key(config, "p0"))
            assert kv is not None and kv.lease != 0
            info = await raw.get_lease_info(kv.lease)
            assert 0 < info.TTL <= TTL_S

    asyncio.run(main())


def test_lapsed_lease_of_a_live_worker_is_granted_again(etcd, config):
    async def main():
        async with EtcdDiscovery(config) as worker, EtcdDiscovery(config) as frontend, \
                aetcd.Client(etcd.host, etcd.port) as raw:
            watcher = Watcher(frontend)
            await worker.register(record("d0"))
            await watcher.wait_for("put", "d0", timeout=2)
            # As if the worker had stalled past its TTL: etcd drops the lease and the key.
            await raw.revoke_lease((await raw.get(key(config, "d0"))).lease)
            gone = await watcher.wait_for("delete", "d0", timeout=2)
            # The next keep-alive finds the lease gone and registers again.
            back = await watcher.wait_for("put", "d0", after=gone,
                                          timeout=config.keepalive_s + MARGIN_S)
            assert back - gone <= config.keepalive_s + MARGIN_S
            assert await listed_ids(frontend) == ["d0"]

    asyncio.run(main())


async def survives_restart(etcd: EtcdServer, config: EtcdDiscoveryConfig, timeout: float) -> None:
    """A registered worker and a watching frontend, then etcd restarts: the watch resumes
    (a worker registering afterwards is seen within `timeout`) and the first worker's
    keep-alive reconnects (it outlives its TTL, and no delete was ever seen)."""
    async with EtcdDiscovery(config) as worker, EtcdDiscovery(config) as frontend:
        watcher = Watcher(frontend)
        await worker.register(record("d0"))
        await watcher.wait_for("put", "d0", timeout=timeout)
        await asyncio.to_thread(etcd.restart)
        restarted = time.monotonic()
        async with EtcdDiscovery(config) as other:
            await other.register(record("d1"))
            await watcher.wait_for("put", "d1", after=restarted, timeout=timeout)
        # Waiting out the TTL is the point: d0 must still be listed after it.
        await asyncio.sleep(config.ttl_s + MARGIN_S)
        assert await listed_ids(frontend) == ["d0"]
        assert not any(e.kind == "delete" and e.worker_id == "d0" for _, e in watcher.events)


def test_watch_and_keepalive_survive_an_etcd_restart(etcd, config):
    asyncio.run(survives_restart(etcd, config, timeout=5))


def test_malformed_keys_under_the_prefix_are_ignored(etcd, config):
    async def main():
        async with EtcdDiscovery(config) as worker, EtcdDiscovery(config) as frontend, \
                aetcd.Client(etcd.host, etcd.port) as raw:
            await raw.put(key(config, "junk"), b"not json")
            await raw.put(key(config, "alias"), b'{"worker_id": "other"}')
            watcher = Watcher(frontend)
            await worker.register(record("p0"))
            await raw.put(key(config, "junk2"), b"{}")
            await raw.delete(key(config, "junk"))
            await watcher.wait_for("put", "p0", timeout=2)
            await worker.deregister("p0")
            await watcher.wait_for("delete", "p0", timeout=2)
            assert [(e.kind, e.worker_id) for _, e in watcher.events] == [("put", "p0"), ("delete", "p0")]
            assert await frontend.list() == []

    asyncio.run(main())


def test_unreachable_etcd_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # bound, never listening: connections are refused
        config = EtcdDiscoveryConfig(host="127.0.0.1", port=port, ttl_s=TTL_S, rpc_timeout_s=2)

        async def main():
            async with EtcdDiscovery(config) as d:
                with pytest.raises(DiscoveryError, match=f"cannot register worker 'p0' in etcd at 127.0.0.1:{port}"):
                    await d.register(record("p0"))
                with pytest.raises(DiscoveryError, match="cannot list workers in etcd"):
                    await d.list()

        asyncio.run(main())


def test_missing_etcd_binary_fails_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="etcd is not installed.*make etcd"):
        EtcdServer()
