"""A real etcd server for tests: one member on 127.0.0.1 free ports, data in a temp dir;
with `tls` (tls_certs.py) clients must speak TLS and present a certificate of that CA.

The Makefile installs etcd before `make test`, so a missing binary is a broken setup,
not a reason to skip: EtcdServer raises with the command that fixes it.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

_START_TIMEOUT_S = 20.0
_PORT_RETRIES = 3  # a free port can be taken between probing it and etcd binding it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """Start with start(), stop with stop(); `host`/`port` is the client endpoint."""

    host = "127.0.0.1"

    def __init__(self, tls=None) -> None:
        self.tls = tls
        self.binary = shutil.which("etcd")
        if self.binary is None:
            raise RuntimeError(
                "etcd is not installed (no `etcd` on PATH). The etcd discovery tests need a "
                "real server: run `make etcd` (apt-get install -y etcd-server) or `make test`.")
        self.port = 0
        self._peer_port = 0
        self._proc: subprocess.Popen | None = None
        self._data_dir: str | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.port}"

    def start(self) -> "EtcdServer":
        for _ in range(_PORT_RETRIES):
            self._data_dir = tempfile.mkdtemp(prefix="splitserve-etcd-")
            self.port, self._peer_port = _free_port(), _free_port()
            if self._launch():
                return self
            tail = self._log_tail()
            self.stop()
        raise RuntimeError(f"etcd did not start; last log:\n{tail}")

    def restart(self) -> None:
        """Stop and start again on the same ports and data: clients must reconnect, and
        leases and keys survive (as in a real etcd restart)."""
        self._terminate()
        if not self._launch():
            raise RuntimeError(f"etcd did not restart; last log:\n{self._log_tail()}")

    def stop(self) -> None:
        self._terminate()
        if self._data_dir is not None:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _terminate(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def _launch(self) -> bool:
        self._log = Path(self._data_dir) / "etcd.log"
        client_url = f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"
        peer_url = f"http://{self.host}:{self._peer_port}"
        cmd = [self.binary, "--name", "test", "--data-dir", str(Path(self._data_dir) / "data"),
               "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
               "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
               "--initial-cluster", f"test={peer_url}", "--log-level", "warn"]
        if self.tls:
            cmd += ["--cert-file", self.tls.server_cert, "--key-file", self.tls.server_key,
                    "--trusted-ca-file", self.tls.ca, "--client-cert-auth"]
        with open(self._log, "ab") as log:
            # Own session: a Ctrl-C on the test run must not reach etcd before we stop it.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if self._healthy(client_url):
                return True
            time.sleep(0.1)
        self._terminate()
        return False

    def _healthy(self, client_url: str) -> bool:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        try:
            with urllib.request.urlopen(f"{client_url}/health", timeout=1, context=context) as r:
                return b'"health":"true"' in r.read()
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self._log.read_text(errors="replace")[-4000:] if self._log else ""
        except OSError:
            return ""
