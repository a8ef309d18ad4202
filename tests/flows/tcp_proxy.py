"""A TCP forwarder a test can break: clients reach a server through it until ``cut()`` (every
connection dropped, new ones refused) or ``hang()`` (connections stay open, nothing answers);
the server itself keeps running for the next test."""

from __future__ import annotations

import contextlib
import socket
import threading

from tests.services import free_port


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.hanging = False
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        self._upstreams: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # cut
                return
            with self._lock:
                self._clients.append(client)
            if self.hanging:
                continue  # held open, never answered
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._upstreams.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            if not self.hanging:  # a hanging server does not close its side either
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)

    def hang(self) -> None:
        """Keep accepting connections, answer none: requests wait for their timeouts."""
        self.hanging = True
        with self._lock:
            for upstream in self._upstreams:
                _close(upstream)

    def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        self._listener.close()
        with self._lock:
            for sock in self._clients + self._upstreams:
                _close(sock)
            self._clients.clear()
            self._upstreams.clear()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
