"""How splitserve reaches etcd: plaintext or TLS (the server verified against a CA, a
client certificate where etcd asks for one), with or without user/password.

aetcd 1.0 opens only plaintext channels and authenticates once: its token dies with an
etcd restart (etcd's default "simple" tokens live in the server's memory) or expires when
unused, after which every call would fail for good. EtcdClient opens the channel itself
and, when etcd says the token is no longer valid, authenticates again and retries once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

import aetcd
import aetcd.exceptions
import grpc
from aetcd import rpc, watcher

from splitserve.discovery.base import DiscoveryError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EtcdAuth:
    """cacert: CA bundle that signed etcd's server certificate (TLS on when it or cert is
    set; without it the system's roots verify the server). cert/key: this process's
    client certificate and key, for etcd's --client-cert-auth. user/password: etcd's
    authentication (the CLI reads the password from the environment, never a command
    line)."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise DiscoveryError("--etcd-cert and --etcd-key go together: a client certificate "
                                 "needs its private key")
        if self.user is not None and not self.password:
            raise DiscoveryError(f"etcd user {self.user!r} needs a password")
        if self.password is not None and self.user is None:
            raise DiscoveryError("an etcd password needs a user")
        for flag, path in (("--etcd-cacert", self.cacert), ("--etcd-cert", self.cert),
                           ("--etcd-key", self.key)):
            if path is not None and not os.path.isfile(path):
                raise DiscoveryError(f"{flag} {path}: no such file")

    @property
    def tls(self) -> bool:
        return self.cacert is not None or self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()
        return grpc.ssl_channel_credentials(read(self.cacert), read(self.key), read(self.cert))


def _token_rejected(e: Exception) -> bool:
    # etcd answers UNAUTHENTICATED "invalid auth token" for a token it no longer knows, and
    # INVALID_ARGUMENT "revision of auth store is old" after users or roles changed.
    return isinstance(e, aetcd.exceptions.UnauthenticatedError) or (
        isinstance(e, aetcd.exceptions.InvalidArgumentError) and "auth store is old" in str(e))


class EtcdClient(aetcd.Client):
    def __init__(self, host: str, port: int, auth: EtcdAuth, timeout: float, options: dict):
        super().__init__(host, port, username=auth.user, password=auth.password, timeout=timeout,
                         options=options)
        self._auth = auth

    # NOTE: mirrors aetcd 1.0's Client.connect, with the channel's credentials added and
    # a failed authentication closing the channel it opened.
    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            options = list(self._options.items())
            self.channel = (rpc.secure_channel(target, self._auth.credentials(), options=options)
                            if self._auth.tls else rpc.insecure_channel(target, options=options))
            self.auth_stub = rpc.AuthStub(self.channel)
            try:
                await self._authenticate()
            except BaseException:
                await self.channel.close()
                self._init_channel_attrs()
                raise
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout,
                                            metadata=self.metadata)
            self._connected.set()
        except rpc.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)
        finally:
            self._is_connecting = False

    async def _authenticate(self) -> None:
        if self._auth.user is None:
            return
        resp = await self.auth_stub.Authenticate(
            rpc.AuthenticateRequest(name=self._auth.user, password=self._auth.password),
            timeout=self._timeout)
        self.metadata = (("token", resp.token),)
        if self._watcher is not None:
            # Watches opened from now on carry the new token (the watcher keeps its own).
            self._watcher._metadata = self.metadata

    async def _retrying(self, call):
        try:
            return await call()
        except aetcd.exceptions.ClientError as e:
            if self._auth.user is None or not self._connected.is_set() or not _token_rejected(e):
                raise
            logger.info("etcd refused this client's token (%s); authenticating again", e)
            try:
                await self._authenticate()
            except rpc.AioRpcError as auth_error:
                aetcd.exceptions._handle_exception(auth_error)
            return await call()

    # The calls discovery makes, each retried once after a fresh authentication.
    async def get_prefix(self, *args, **kwargs):
        return await self._retrying(lambda: super(EtcdClient, self).get_prefix(*args, **kwargs))

    async def put(self, *args, **kwargs):
        return await self._retrying(lambda: super(EtcdClient, self).put(*args, **kwargs))

    async def lease(self, *args, **kwargs):
        return await self._retrying(lambda: super(EtcdClient, self).lease(*args, **kwargs))

    async def refresh_lease(self, *args, **kwargs):
        return await self._retrying(lambda: super(EtcdClient, self).refresh_lease(*args, **kwargs))

    async def revoke_lease(self, *args, **kwargs):
        return await self._retrying(lambda: super(EtcdClient, self).revoke_lease(*args, **kwargs))

    async def watch_prefix(self, *args, **kwargs):
        return await self._retrying(lambda: super(EtcdClient, self).watch_prefix(*args, **kwargs))
