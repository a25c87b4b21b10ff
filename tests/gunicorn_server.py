"""The shim under gunicorn on loopback, as `make serve` runs it, for tests that need real
processes and real concurrency."""

import contextlib
import os
import subprocess
import time

import pytest
import requests

from shim.cli import gunicorn_argv
from shim.fakes.serve import free_port
from tests.conftest import SECRETS

START_TIMEOUT_SECONDS = 60  # a loaded machine imports slowly; the start time is not tested


def wait_until_serving(server: subprocess.Popen, url: str) -> bool:
    """True once /healthz answers 200; False if gunicorn exits first (its port was taken) or
    does not answer in time."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return False


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(30)  # --graceful-timeout 20, plus the master's own shutdown
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(10)


@contextlib.contextmanager
def running_gunicorn(db_url: str, tmp_path, extra_env: dict | None = None, workers=2, threads=4):
    """gunicorn serving the app on 127.0.0.1 with every test secret (and `extra_env`); yields
    its URL and stops it afterwards."""
    log = tmp_path / "gunicorn.log"
    for attempt in range(3):  # the free port may be taken between the probe and gunicorn's bind
        metrics_dir = tmp_path / f"metrics-{attempt}"  # no samples of an earlier attempt
        metrics_dir.mkdir()
        env = dict(
            os.environ,
            DATABASE_URL=db_url,
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
            **{name.upper(): value for name, value in SECRETS.items()},
            **(extra_env or {}),
        )
        port = free_port()
        argv = gunicorn_argv(port, workers=workers, threads=threads, host="127.0.0.1")
        with log.open("ab") as log_file:
            server = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        if wait_until_serving(server, url):
            break
        stop(server)
    else:
        pytest.fail(f"gunicorn did not start: {log.read_text()}")
    try:
        yield url
    finally:
        stop(server)
