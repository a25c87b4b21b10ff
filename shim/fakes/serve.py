"""Run a WSGI app on loopback in a background thread, so tests and the demo can talk HTTP to it."""

import socket
import threading

from werkzeug.serving import WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    """Request handler that skips per-request access logs, which would drown test output."""

    def log_request(self, code="-", size="-"):
        """Drop the access-log line; errors still go through log_error."""


def free_port() -> int:
    """A loopback port nobody listens on right now (for servers started as processes)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_in_thread(app, host="127.0.0.1", port=0):
    """Serve `app` on host:port (0 = any free port); return (base_url, stop_fn)."""
    server = make_server(host, port, app, threaded=True, request_handler=_QuietHandler)
    # A short poll interval keeps stop() (and so every test teardown) fast.
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name=f"serve-{server.port}",
        daemon=True,
    )
    thread.start()

    def stop():
        """Stop accepting requests, close the socket and wait for the serving thread."""
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return f"http://{host}:{server.port}", stop
