"""A loopback TCP proxy to the test database that a test can cut and restore, to show what the
shim answers while the database is unreachable."""

import contextlib
import socket
import threading


class DatabaseProxy:
    """Listens on 127.0.0.1:<port> and forwards to the database's socket (Unix or TCP)."""

    def __init__(self, target_host: str, target_port: int):
        self.target = target_host, target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _connect_target(self) -> socket.socket:
        host, port = self.target
        if host.startswith("/"):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(f"{host}/.s.PGSQL.{port}")
            return sock
        return socket.create_connection((host, port))

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up.is_set():
                client.close()
                continue
            upstream = self._connect_target()
            with self.lock:
                self.connections += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)

    def cut(self):
        """Refuse new connections and sever every open one, as a network partition would."""
        self.up.clear()
        with self.lock:
            for sock in self.connections:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.connections.clear()

    def restore(self):
        self.up.set()

    def close(self):
        self.cut()
        self.listener.close()
