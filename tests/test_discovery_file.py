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
