"""The discovery contract, run against both live backends (file store and a real etcd):
workers in other processes register, are listed and watched, deregister on a clean exit,
disappear within TTL + margin when SIGKILLed, and come back when restarted."""

import asyncio
import signal
import subprocess
import sys
import time
import uuid

import msgspec
import pytest

from etcd_server import EtcdServer
from splitserve.discovery import Discovery, WatchEvent, WorkerRecord, parse_discovery

TTL_S = 2
# Covers the heartbeat/keep-alive period, the file store's poll and etcd's lease-expiry
# sweep, with room for a loaded 2-core CI machine.
MARGIN_S = 2.0

# A worker process: registers, prints READY, deregisters cleanly on SIGTERM.
REGISTRANT = r"""
import asyncio, signal, sys
from splitserve.discovery import WorkerRecord, parse_discovery

async def main(url, namespace, worker_id):
    discovery = parse_discovery(url, namespace=namespace, ttl_s=int(sys.argv[4]))
    await discovery.register(WorkerRecord(
        worker_id=worker_id, role="prefill", api_url="http://127.0.0.1:9", model_name="tiny",
        metrics_url="http://127.0.0.1:9/metrics", kv_host="127.0.0.1", kv_port=10,
        state="ready"))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()
    await discovery.close()

asyncio.run(main(*sys.argv[1:4]))
"""


@pytest.fixture(scope="module")
def etcd():
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=["file", "etcd"])
def backend_url(request, tmp_path):
    if request.param == "file":
        return f"file:{tmp_path / 'workers'}"
    return request.getfixturevalue("etcd").url


@pytest.fixture
def namespace():
    return f"test-{uuid.uuid4().hex[:8]}"


def record(worker_id: str, **kw) -> WorkerRecord:
    fields = {"role": "decode", "api_url": "http://127.0.0.1:9",
              "metrics_url": "http://127.0.0.1:9/metrics", "model_name": "tiny", **kw}
    return WorkerRecord(worker_id=worker_id, **fields)


class Registrant:
    """A worker registering from its own process."""

    started: list[subprocess.Popen] = []    # killed after each test, passed or failed

    def __init__(self, url: str, namespace: str, worker_id: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REGISTRANT, url, namespace, worker_id, str(TTL_S)],
            stdout=subprocess.PIPE, text=True)
        Registrant.started.append(self.proc)

    async def ready(self) -> None:
        line = await asyncio.to_thread(self.proc.stdout.readline)
        assert line == "READY\n", f"registrant failed (exit {self.proc.poll()})"

    def stop(self, sig: int) -> float:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)
        return time.monotonic()


@pytest.fixture(autouse=True)
def no_stray_registrants():
    yield
    while Registrant.started:
        proc = Registrant.started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


class Watcher:
    """Collects a discovery watch's events in the background, with arrival times."""

    def __init__(self, discovery: Discovery) -> None:
        self.events: list[tuple[float, WatchEvent]] = []
        self._task = asyncio.create_task(self._run(discovery))

    async def _run(self, discovery: Discovery) -> None:
        async for event in discovery.watch():
            self.events.append((time.monotonic(), event))

    async def wait_for(self, kind: str, worker_id: str, timeout: float, after: float = 0.0) -> float:
        """Arrival time of the first such event that arrived after `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, event in self.events:
                if t > after and event.kind == kind and event.worker_id == worker_id:
                    return t
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {kind} event for {worker_id} within {timeout} s: {self.events}")

    async def finished(self) -> None:
        await asyncio.wait_for(self._task, 5)


async def listed_ids(discovery: Discovery) -> list[str]:
    return [r.worker_id for r in await discovery.list()]


async def wait_listed(discovery: Discovery, worker_id: str, present: bool, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (worker_id in await listed_ids(discovery)) == present:
            return time.monotonic()
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker_id} still {'absent' if present else 'listed'} after {timeout} s")


def test_register_update_deregister_seen_by_another_instance(backend_url, namespace):
    async def main():
        async with parse_discovery(backend_url, namespace=namespace, ttl_s=TTL_S) as worker, \
                parse_discovery(backend_url, namespace=namespace, ttl_s=TTL_S) as frontend:
            assert await frontend.list() == []
            before = time.time()
            await worker.register(record("d0"))
            await worker.register(record("p0", role="prefill", kv_host="10.0.0.1", kv_port=7000))
            assert await listed_ids(frontend) == ["d0", "p0"]
            p0 = (await frontend.list())[1]
            assert (p0.role, p0.kv_host, p0.kv_port, p0.state) == ("prefill", "10.0.0.1", 7000, "loading")
            assert p0.last_heartbeat >= before

            await worker.update(record("d0", state="ready", num_requests_running=3,
                                       kv_blocks_in_use=25, kv_blocks_total=100))
            d0 = (await frontend.list())[0]
            assert (d0.state, d0.num_requests_running, d0.kv_usage) == ("ready", 3, 0.25)

            await worker.deregister("d0")
            assert await listed_ids(frontend) == ["p0"]
        # Closing the worker's instance deregistered p0 as well.
        async with parse_discovery(backend_url, namespace=namespace) as frontend:
            assert await frontend.list() == []

    asyncio.run(main())


def test_update_of_unregistered_worker_is_refused(backend_url, namespace):
    async def main():
        async with parse_discovery(backend_url, namespace=namespace, ttl_s=TTL_S) as d:
            with pytest.raises(Exception, match="unregistered worker 'x'"):
                await d.update(record("x"))

    asyncio.run(main())


def test_watch_sees_worker_process_register_and_exit_cleanly(backend_url, namespace):
    async def main():
        async with parse_discovery(backend_url, namespace=namespace, ttl_s=TTL_S) as frontend:
            watcher = Watcher(frontend)
            worker = Registrant(backend_url, namespace, "p1")
            await worker.ready()
            await watcher.wait_for("put", "p1", timeout=15)
            put = next(e for _, e in watcher.events if e.kind == "put")
            assert put.record.role == "prefill" and put.record.kv_port == 10

            stopped = worker.stop(signal.SIGTERM)
            gone = await watcher.wait_for("delete", "p1", timeout=TTL_S + MARGIN_S)
            # A clean exit deregisters: the worker leaves well before its TTL would lapse.
            assert gone - stopped < TTL_S / 2, gone - stopped
        await watcher.finished()  # close() ends the watch

    asyncio.run(main())


def test_sigkilled_worker_disappears_within_ttl(backend_url, namespace):
    async def main():
        async with parse_discovery(backend_url, namespace=namespace, ttl_s=TTL_S) as frontend:
            watcher = Watcher(frontend)
            worker = Registrant(backend_url, namespace, "d1")
            await worker.ready()
            await wait_listed(frontend, "d1", present=True, timeout=15)
            # Outlive a few heartbeats first: the registration is renewed, not just young.
            await asyncio.sleep(TTL_S + 0.5)
            assert "d1" in await listed_ids(frontend)

            killed = worker.stop(signal.SIGKILL)
            # No one deregistered it: still listed right after the kill, gone within the TTL.
            assert "d1" in await listed_ids(frontend)
            gone = await wait_listed(frontend, "d1", present=False, timeout=TTL_S + MARGIN_S)
            assert gone - killed <= TTL_S + MARGIN_S
            await watcher.wait_for("delete", "d1", timeout=1)

    asyncio.run(main())


def test_restarted_worker_registers_again(backend_url, namespace):
    async def main():
        async with parse_discovery(backend_url, namespace=namespace, ttl_s=TTL_S) as frontend:
            first = Registrant(backend_url, namespace, "p2")
            await first.ready()
            first.stop(signal.SIGKILL)
            # Restarted before the dead one's registration lapsed: the new registration
            # replaces it, and the old one's expiry must not take the new one down.
            second = Registrant(backend_url, namespace, "p2")
            await second.ready()
            await asyncio.sleep(TTL_S + MARGIN_S)
            assert await listed_ids(frontend) == ["p2"]
            second.stop(signal.SIGTERM)
            await wait_listed(frontend, "p2", present=False, timeout=1)

    asyncio.run(main())


def test_records_are_msgspec_json_with_validation():
    rec = record("p0", role="prefill", kv_host="h", kv_port=1, num_pending_prefill_tokens=64)
    data = msgspec.json.encode(rec)
    assert msgspec.json.decode(data, type=WorkerRecord) == rec
    with pytest.raises(msgspec.ValidationError, match="kv_host and kv_port"):
        msgspec.json.decode(data.replace(b'"kv_port":1', b'"kv_port":null'), type=WorkerRecord)
    with pytest.raises(msgspec.ValidationError, match="role"):
        msgspec.json.decode(data.replace(b'"prefill"', b'"router"'), type=WorkerRecord)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.json.decode(data[:-1] + b',"extra":1}', type=WorkerRecord)
