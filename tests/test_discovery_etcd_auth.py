"""etcd discovery behind etcd's own protections, against a real etcd: user/password
authentication (a wrong or missing password is a clear error; the keep-alive and watch
survive an etcd restart, which forgets every token) and TLS with client certificates."""

from __future__ import annotations

import asyncio
import json
import uuid

import aetcd
import pytest
from aetcd import rpc

from etcd_server import EtcdServer
from splitserve.cli.discovery_args import PASSWORD_ENV, discovery_from_args
from splitserve.cli.main import build_parser
from splitserve.discovery import DiscoveryError, EtcdDiscovery, EtcdDiscoveryConfig
from splitserve.discovery.etcd_client import EtcdAuth
from test_discovery_backends import listed_ids, record
from test_discovery_etcd import survives_restart
from tls_certs import make_tls_files

TTL_S = 2
PASSWORD = "etcd-test-password"


async def _enable_auth(etcd: EtcdServer) -> None:
    """As an operator would: a root user with the root role, then authentication on."""
    async with aetcd.Client(etcd.host, etcd.port) as raw:
        auth = rpc.AuthStub(raw.channel)
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=PASSWORD))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.AuthEnable(rpc.AuthEnableRequest())


@pytest.fixture(scope="module")
def etcd_with_auth():
    with EtcdServer() as server:
        asyncio.run(_enable_auth(server))
        yield server


def _config(etcd: EtcdServer, auth: EtcdAuth) -> EtcdDiscoveryConfig:
    return EtcdDiscoveryConfig(host=etcd.host, port=etcd.port, ttl_s=TTL_S, auth=auth,
                               namespace=f"test-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("auth, message", [
    (EtcdAuth(), "user name is empty"),
    (EtcdAuth(user="root", password="wrong"), "authentication failed"),
])
def test_without_the_right_password_registration_fails_saying_why(etcd_with_auth, auth, message):
    async def main():
        async with EtcdDiscovery(_config(etcd_with_auth, auth)) as worker:
            with pytest.raises(DiscoveryError, match=message):
                await worker.register(record("p0"))

    asyncio.run(main())


def test_with_the_password_workers_register_and_survive_an_etcd_restart(etcd_with_auth):
    # A restarted etcd knows none of the tokens it handed out: each client authenticates
    # again on its next call (the keep-alive too, or d0 would lapse).
    config = _config(etcd_with_auth, EtcdAuth(user="root", password=PASSWORD))
    asyncio.run(survives_restart(etcd_with_auth, config, timeout=10))


def test_tls_with_client_certificates(tmp_path):
    tls = make_tls_files(tmp_path)
    with EtcdServer(tls=tls) as etcd:
        good = _config(etcd, EtcdAuth(cacert=tls.ca, cert=tls.client_cert, key=tls.client_key))

        async def main():
            async with EtcdDiscovery(good) as worker, EtcdDiscovery(good) as frontend:
                await worker.register(record("p0"))
                assert await listed_ids(frontend) == ["p0"]
            # etcd asks for a client certificate; and plaintext is no TLS at all.
            for auth in (EtcdAuth(cacert=tls.ca), EtcdAuth()):
                config = EtcdDiscoveryConfig(host=etcd.host, port=etcd.port, auth=auth,
                                             namespace=good.namespace, rpc_timeout_s=2.0)
                async with EtcdDiscovery(config) as stranger:
                    with pytest.raises(DiscoveryError):
                        await stranger.register(record("p1"))

        asyncio.run(main())


def _discovery(argv: list[str]):
    parser = build_parser()
    args = parser.parse_args(["worker", *argv])
    return discovery_from_args(args.parser, args)


def test_etcd_flags_are_checked_at_start_up(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked until connecting")
    for argv, message in [
        (["--discovery", "etcd://10.0.0.2:2379", "--etcd-user", "root"], f"needs its password in ${PASSWORD_ENV}"),
        (["--discovery", "etcd://10.0.0.2:2379", "--etcd-cert", str(ca)], "--etcd-cert and --etcd-key go together"),
        (["--discovery", "etcd://10.0.0.2:2379", "--etcd-cacert", str(tmp_path / "none")], "no such file"),
        (["--discovery", f"file:{tmp_path}", "--etcd-cacert", str(ca)], "apply to etcd discovery"),
    ]:
        with pytest.raises(SystemExit) as e:
            _discovery(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    # The password comes from the environment only.
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    discovery = _discovery(["--discovery", "etcd://10.0.0.2:2379", "--etcd-user", "root",
                            "--etcd-cacert", str(ca)])
    assert discovery.config.auth == EtcdAuth(cacert=str(ca), user="root", password=PASSWORD)
    assert PASSWORD not in repr(discovery.config)


def test_doctor_reads_discovery_through_the_same_etcd_flags(etcd_with_auth, monkeypatch, capsys):
    """`splitserve doctor --discovery etcd://…` takes the workers' own etcd flags: with the
    user and $SPLITSERVE_ETCD_PASSWORD it lists the registered worker (and names it as
    unreachable: nothing listens at its API); without them the listing is the ✘."""
    from splitserve.cli.main import main

    config = _config(etcd_with_auth, EtcdAuth(user="root", password=PASSWORD))
    argv = ["doctor", "--discovery", etcd_with_auth.url, "--namespace", config.namespace,
            "--bandwidth-mb", "0", "--json"]

    async def run():
        async with EtcdDiscovery(config) as worker:
            await worker.register(record("d0"))
            monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
            with_password = await asyncio.to_thread(main, [*argv, "--etcd-user", "root"])
            report = json.loads(capsys.readouterr().out)
            monkeypatch.delenv(PASSWORD_ENV)
            without = await asyncio.to_thread(main, argv)
            return with_password, report, without, json.loads(capsys.readouterr().out)

    rc, report, rc_without, report_without = asyncio.run(run())
    by = {c["id"]: c for c in report["checks"]}
    assert rc == 1 and by["workers"]["status"] == "ok"
    assert by["workers"]["title"] == f"workers listed by discovery {etcd_with_auth.url}: 1 decode"
    assert by["reachable"]["subject"] == "decode worker d0 at http://127.0.0.1:9"
    [listing] = report_without["checks"]
    assert rc_without == 1 and listing["id"] == "workers" and listing["status"] == "fail"
    assert "user name is empty" in listing["details"][0]
