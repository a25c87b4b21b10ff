"""The demo's processes: a fresh database, the shim under gunicorn, the worker, and the fake
Stripe and Vapi APIs, all on loopback. Everything started here is stopped on exit or Ctrl-C."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import requests
from psycopg import sql

from shim.cli import gunicorn_argv
from shim.database import database_url
from shim.fakes import stripe_api, twilio_api, vapi_api
from shim.fakes.serve import free_port, serve_in_thread
from shim.migrate import migrate

DEMO_DATABASE = "creditledger_demo"
SECRETS = {
    "STRIPE_API_KEY": "sk_test_demo",
    "STRIPE_WEBHOOK_SECRET": "whsec_demo",
    "VAPI_API_KEY": "vapi-demo-key",
    "VAPI_WEBHOOK_SECRET": "vapi-demo-secret",
    "TWILIO_ACCOUNT_SID": "AC" + "d" * 32,
    "TWILIO_AUTH_TOKEN": "twilio-demo-token",
    "SUPABASE_JWT_SECRET": "supabase-demo-jwt-secret-32-bytes-long",
}


def fresh_database(server_url: str) -> str:
    """(Re)create the demo database on the server and migrate it; return its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DEMO_DATABASE)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DEMO_DATABASE)))
    url = urlunsplit(urlsplit(server_url)._replace(path=f"/{DEMO_DATABASE}"))
    migrate(url)
    return url


def wait_until_up(url: str, process: subprocess.Popen, log: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the shim exited early:\n{log.read_text()}")
        # A worker still booting (opening its pool) may accept and answer late: not up yet either.
        with contextlib.suppress(requests.ConnectionError, requests.Timeout):
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the shim did not come up:\n{log.read_text()}")


@dataclass
class Stack:
    """Handles on everything the day talks to."""

    out_dir: Path
    db_url: str = ""
    shim_url: str = ""
    stripe_url: str = ""
    vapi_url: str = ""
    twilio_url: str = ""
    env: dict = field(default_factory=dict)
    _stops: list = field(default_factory=list)
    _processes: list = field(default_factory=list)

    def __enter__(self):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # Ctrl-C and SIGTERM unwind through __exit__, which stops every process we started.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self):
        self.db_url = fresh_database(database_url())
        port = free_port()
        self.shim_url = f"http://127.0.0.1:{port}"
        self.stripe_url, stop = serve_in_thread(
            stripe_api.create_app(
                webhook_url=f"{self.shim_url}/webhooks/stripe",
                webhook_secret=SECRETS["STRIPE_WEBHOOK_SECRET"],
            )
        )
        self._stops.append(stop)
        self.vapi_url, stop = serve_in_thread(vapi_api.create_app(SECRETS["VAPI_API_KEY"]))
        self._stops.append(stop)
        self.twilio_url, stop = serve_in_thread(
            twilio_api.create_app(SECRETS["TWILIO_ACCOUNT_SID"], SECRETS["TWILIO_AUTH_TOKEN"])
        )
        self._stops.append(stop)
        self.env = dict(
            os.environ,
            DATABASE_URL=self.db_url,
            STRIPE_API_BASE=self.stripe_url,
            VAPI_API_BASE=self.vapi_url,
            TWILIO_API_BASE=self.twilio_url,
            PUBLIC_BASE_URL=self.shim_url,
            **SECRETS,
        )

        log = self.out_dir / "shim.log"
        self._spawn(gunicorn_argv(port, workers=2, threads=8, host="127.0.0.1"), log)
        wait_until_up(self.shim_url, self._processes[-1], log)
        self._spawn(
            [sys.executable, "-m", "shim.cli", "worker", "--interval", "0.5"], self.out_dir / "worker.log"
        )
        self._wait_for_first_worker_pass()

    def _wait_for_first_worker_pass(self, seconds: float = 60) -> None:
        """The worker's first pass runs its scheduled reconciliations; the day starts after it,
        so that what the day's own reconciliation recovers is the same on every run."""
        deadline = time.monotonic() + seconds
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            while time.monotonic() < deadline and self._processes[-1].poll() is None:
                done = conn.execute(
                    "SELECT count(*) FROM billing.reconciliation_runs WHERE status = 'completed'"
                ).fetchone()[0]
                if done >= 3:  # Stripe, Vapi and Twilio
                    return
                time.sleep(0.1)
        log = (self.out_dir / "worker.log").read_text()
        raise RuntimeError(f"the worker's first pass did not complete:\n{log}")

    def _spawn(self, argv: list[str], log: Path) -> None:
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                argv, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._processes.append(process)

    def __exit__(self, *exc):
        for process in reversed(self._processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for stop in reversed(self._stops):
            stop()
        return False
