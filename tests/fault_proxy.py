"""A threaded TCP proxy on 127.0.0.1 that injects faults into what the server sends back.

    with FaultProxy(("127.0.0.1", port)) as proxy:
        proxy.reset_after(100_000, times=3)   # next 3 connections: RST after 100 kB downstream
        proxy.flip_byte(50_000)               # once: invert one downstream byte at that offset
        proxy.stall(True)                     # hold all bytes until stall(False)
        proxy.hold_after(16 << 20)            # pass 16 MB downstream, then stall (proxy.held)
        client connects to proxy.address

"Downstream" is server -> client (for KV: P -> D, the payload direction). Offsets count
bytes per connection. Resets are real RSTs (SO_LINGER 0) on both sides, which is what
`Connection reset by peer` looks like in production. A connection to a target that is
gone (refused) is reset at once, as a direct connection would be refused.
"""

from __future__ import annotations

import socket
import struct
import threading


class FaultProxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._lsock.getsockname()[:2]
        self._lock = threading.Lock()
        self._flowing = threading.Event()
        self._flowing.set()
        self._reset_at: int | None = None
        self._resets_left = 0
        self._flip_at: int | None = None
        self._hold_at: int | None = None
        self.held = threading.Event()     # a hold_after began holding
        self._socks: list[socket.socket] = []
        self._closed = False
        self.connections = 0
        self.resets = 0
        self.flips = 0

    def __enter__(self) -> "FaultProxy":
        threading.Thread(target=self._accept_loop, daemon=True, name="fault-proxy").start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset_after(self, nbytes: int, times: int = 1) -> None:
        with self._lock:
            self._reset_at, self._resets_left = nbytes, times

    def flip_byte(self, offset: int) -> None:
        with self._lock:
            self._flip_at = offset

    def hold_after(self, nbytes: int) -> None:
        """The next connection passes `nbytes` downstream, then holds the rest (as
        stall(True)) until stall(False); `held` is set when it starts holding."""
        with self._lock:
            self._hold_at = nbytes
        self.held.clear()

    def stall(self, on: bool) -> None:
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self._flowing.set()
        for s in [self._lsock, *self._socks]:
            _hard_close(s)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self.connections += 1
                reset_at = None
                if self._resets_left > 0:
                    reset_at, self._resets_left = self._reset_at, self._resets_left - 1
                self._socks += [client, server]
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, None, pair),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, reset_at, pair),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, reset_at: int | None,
              pair: tuple[socket.socket, socket.socket]) -> None:
        downstream = reset_at is not None or src is pair[1]
        offset = 0
        try:
            while True:
                data = bytearray(src.recv(1 << 16))
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                self._flowing.wait()
                if downstream:
                    sent = self._hold(dst, data, offset)
                    data, offset = data[sent:], offset + sent
                    data = self._flip(data, offset)
                    if reset_at is not None and offset + len(data) >= reset_at:
                        dst.sendall(data[:reset_at - offset])
                        with self._lock:
                            self.resets += 1
                        for s in pair:
                            _hard_close(s)
                        return
                dst.sendall(data)
                offset += len(data)
        except OSError:
            for s in pair:
                _hard_close(s)

    def _hold(self, dst: socket.socket, data: bytearray, offset: int) -> int:
        """Past a hold_after's offset: send what comes before it, stall until released;
        returns how many bytes of `data` it sent (0: no hold here)."""
        with self._lock:
            at = self._hold_at
            if at is None or offset + len(data) <= at:
                return 0
            self._hold_at = None
        cut = max(0, at - offset)
        dst.sendall(data[:cut])
        self._flowing.clear()
        self.held.set()
        self._flowing.wait()
        return cut

    def _flip(self, data: bytearray, offset: int) -> bytearray:
        with self._lock:
            at = self._flip_at
            if at is not None and offset <= at < offset + len(data):
                data[at - offset] ^= 0xFF
                self._flip_at = None
                self.flips += 1
        return data


def _hard_close(s: socket.socket) -> None:
    """Close with RST instead of FIN. SHUT_RD wakes a thread blocked in recv on `s`
    without sending anything, so the peer sees only the RST."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    s.close()
