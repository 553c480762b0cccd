"""File-store specifics: what a reader ignores (stale, malformed, misnamed, temporary
files) and that readers in other threads never see a half-written record."""

import asyncio
import threading
import time

from splitserve.discovery import FileDiscovery, FileDiscoveryConfig, encode_record
from test_discovery_backends import listed_ids, record


def test_reader_ignores_stale_malformed_misnamed_and_temporary_files(tmp_path, caplog):
    config = FileDiscoveryConfig(directory=tmp_path, ttl_s=2)
    (tmp_path / "stale.json").write_bytes(
        encode_record(record("stale", last_heartbeat=time.time() - 3)))
    (tmp_path / "junk.json").write_bytes(b"{not json")
    (tmp_path / "alias.json").write_bytes(encode_record(record("other", last_heartbeat=time.time())))
    (tmp_path / ".live.123.tmp").write_bytes(b"{")
    (tmp_path / "notes.txt").write_bytes(b"hello")

    async def main():
        async with FileDiscovery(config) as worker, FileDiscovery(config) as frontend:
            await worker.register(record("live"))
            assert await listed_ids(frontend) == ["live"]
            assert await listed_ids(frontend) == ["live"]

    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # Each bad file is reported once, however often it is read.
    assert len(warnings) == 2, warnings
    assert any("junk.json" in w for w in warnings)
    assert any("alias.json" in w and "'other'" in w for w in warnings)


def test_readers_never_see_a_partial_record(tmp_path):
    config = FileDiscoveryConfig(directory=tmp_path, ttl_s=5)
    seen: list[list[str]] = []
    done = threading.Event()

    def read_continuously() -> None:
        reader = FileDiscovery(config)
        while not done.is_set():
            seen.append(asyncio.run(listed_ids(reader)))

    async def main():
        async with FileDiscovery(config) as worker:
            await worker.register(record("w", model_name="m" * 4096))
            thread = threading.Thread(target=read_continuously)
            thread.start()
            for i in range(200):
                await worker.update(record("w", model_name="m" * 4096, num_requests_running=i))
            done.set()
            await asyncio.to_thread(thread.join)

    asyncio.run(main())
    assert seen and all(ids == ["w"] for ids in seen)


def test_a_heartbeat_cancelled_mid_write_does_not_bring_back_a_deregistered_worker(tmp_path):
    # A worker shutting down cancels its refresh task, then deregisters. The cancelled
    # update's write keeps running on the I/O thread; the record must still be gone after
    # it lands (CI: a stopped worker's file reappeared and stayed).
    config = FileDiscoveryConfig(directory=tmp_path)
    entered, release, written = threading.Event(), threading.Event(), threading.Event()

    async def main():
        async with FileDiscovery(config) as disc:
            await disc.register(record("w1"))
            write = disc._write

            def held_write(rec):
                entered.set()
                assert release.wait(10)
                write(rec)
                written.set()

            disc._write = held_write
            update = asyncio.create_task(disc.update(record("w1")))
            assert await asyncio.to_thread(entered.wait, 10)
            update.cancel()
            await asyncio.gather(update, return_exceptions=True)
            deregister = asyncio.create_task(disc.deregister("w1"))
            # Let the deregistration run as far as it can before the write lands.
            await asyncio.sleep(0)
            release.set()
            await deregister
            assert await asyncio.to_thread(written.wait, 10)
            assert not (tmp_path / "w1.json").exists()

    asyncio.run(main())
