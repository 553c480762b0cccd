"""Static discovery and the --discovery URL parser: what is accepted, and that every
mistake is refused with a message naming the expected form."""

import asyncio

import pytest

from splitserve.discovery import (
    DiscoveryError, EtcdDiscovery, FileDiscovery, StaticDiscovery, parse_discovery)
from test_discovery_backends import record


def test_static_lists_synthesized_records_with_roles():
    d = parse_discovery("static:http://127.0.0.1:8001/, prefill=http://10.0.0.2:9000,decode=https://h:1")
    assert isinstance(d, StaticDiscovery)

    async def main():
        records = await d.list()
        assert [(r.worker_id, r.role, r.api_url, r.state) for r in records] == [
            ("10.0.0.2:9000", "prefill", "http://10.0.0.2:9000", "unknown"),
            ("127.0.0.1:8001", "both", "http://127.0.0.1:8001", "unknown"),
            ("h:1", "decode", "https://h:1", "unknown")]
        assert records[1].metrics_url == "http://127.0.0.1:8001/metrics"
        events = []

        async def follow():
            async for e in d.watch():
                events.append((e.kind, e.worker_id))

        task = asyncio.create_task(follow())
        await asyncio.sleep(0.05)
        assert events == [("put", "10.0.0.2:9000"), ("put", "127.0.0.1:8001"), ("put", "h:1")]
        assert not task.done()      # a static list never changes: the watch waits for close
        await d.close()
        await asyncio.wait_for(task, 1)
        with pytest.raises(DiscoveryError, match="read-only"):
            await d.register(record("x"))

    asyncio.run(main())


def test_parse_builds_each_backend_with_its_options(tmp_path):
    f = parse_discovery(f"file:{tmp_path}", ttl_s=3)
    assert isinstance(f, FileDiscovery)
    assert (f.config.directory, f.config.ttl_s, f.config.heartbeat_s) == (tmp_path, 3, 1.0)
    e = parse_discovery("etcd://etcd.svc:2380", namespace="prod")
    assert isinstance(e, EtcdDiscovery)
    assert (e.config.host, e.config.port, e.config.ttl_s) == ("etcd.svc", 2380, 10)
    assert e.config.prefix == b"/splitserve/prod/workers/"
    assert parse_discovery("etcd://etcd.svc").config.port == 2379


@pytest.mark.parametrize("url, message", [
    ("workers", "has no scheme; expected file:DIR, etcd://HOST:PORT or static:URL"),
    ("consul://h:1", "unknown discovery scheme 'consul'"),
    ("file:", "expected file:DIR"),
    ("file:///tmp/w", "expected file:DIR"),
    ("etcd://:2379", "expected etcd://HOST:PORT"),
    ("etcd://h:2379/x", "expected etcd://HOST:PORT"),
    ("etcd://h:port", "Port could not be cast"),
    ("static:", "needs at least one worker URL"),
    ("static:localhost:8000", "expected http://HOST:PORT"),
    ("static:http://h", "expected http://HOST:PORT"),
    ("static:router=http://h:1", "role must be one of"),
    ("static:http://h:1,http://h:1/", "lists a worker twice"),
])
def test_parse_errors_name_the_expected_form(url, message):
    with pytest.raises(DiscoveryError, match=message):
        parse_discovery(url)


@pytest.mark.parametrize("kwargs, message", [
    ({"namespace": "a/b"}, "namespace must be non-empty without '/'"),
    ({"namespace": ""}, "namespace must be non-empty"),
    ({"ttl_s": 0}, "positive integer"),
])
def test_etcd_options_are_validated(kwargs, message):
    with pytest.raises(DiscoveryError, match=message):
        parse_discovery("etcd://h:1", **kwargs)
