"""A loopback TCP forwarder that the tests use as a network they control: cut it, freeze it, or let a
request through only up to a byte count (so a writer can be killed with half its upload sent)."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target`; `stop()` closes the listener and every connection."""

    def __init__(self, target: tuple[str, int], port: int = 0):
        """`port`: listen where an earlier, stopped proxy did (the network coming back)."""
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._upstream_budget: int | None = None  # bytes client -> server still allowed; None: unlimited
        self.held = threading.Event()  # set once the budget ran out and traffic is being held back
        self._frozen = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold_upstream_after(self, n_bytes: int) -> None:
        """Forward only `n_bytes` more client->server bytes, then hold the rest back and set `held`."""
        with self._lock:
            self._upstream_budget = n_bytes

    def freeze(self) -> None:
        """Keep every connection open but forward nothing more: a hung endpoint."""
        self._frozen.set()

    def stop(self) -> None:
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream: bool) -> None:
        try:
            while data := source.recv(65536):
                if self._frozen.is_set():
                    continue
                if upstream:
                    with self._lock:
                        if self._upstream_budget is not None:
                            data = data[: self._upstream_budget]
                            self._upstream_budget -= len(data)
                            if self._upstream_budget == 0:
                                self.held.set()
                sink.sendall(data)
        except OSError:
            pass
        finally:  # one side hung up (or was killed): hang up the other, as a real network would
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
