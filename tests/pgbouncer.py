"""Debian's pgbouncer in transaction mode on loopback, in front of the test server: how Supabase
clients reach the database on port 6543 (Supavisor or the dedicated pgbouncer, both transaction
pooling), for tests/test_pooler.py.

    with PgBouncer(server_url, default_pool_size=4) as bouncer:
        url = bouncer.url_for(db_url)   # the same database, through the pooler

The test server is either the embedded pgserver (a Unix socket inside its data folder, owned by
the system user pgserver creates when run as root) or TEST_DATABASE_URL (CI: Debian's
PostgreSQL 15 on 127.0.0.1 with a password). pgbouncer refuses to run as root, so as root it is
started with `-u <user>`: the owner of the server's socket folder when that is not root (the only
user that can reach pgserver's socket), else `postgres`, else `nobody`. Its ini and auth file
sit in a private folder owned by that user (pytest's tmp_path is root-only, 0700).

Clients log in with auth_type = trust (the auth file lists the test login role); pgbouncer logs
in to the server with the real password, written into the [databases] connection string.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import quote as quote_url

import pytest
from psycopg.conninfo import conninfo_to_dict

from shim.fakes.serve import free_port

# Debian installs pgbouncer in /usr/sbin, which is not on a normal user's PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
START_TIMEOUT_SECONDS = 15.0


def pgbouncer_binary() -> str | None:
    """The pgbouncer executable, or None when it is not installed."""
    return shutil.which("pgbouncer", path=SEARCH_PATH)


def require_pgbouncer() -> str:
    """The pgbouncer executable; skip the test when it is missing, unless REQUIRE_PGBOUNCER=1
    (CI sets it, so that a missing package fails the run instead of hiding the tests)."""
    binary = pgbouncer_binary()
    if binary is None:
        message = "pgbouncer is not installed (Debian: apt-get install pgbouncer)"
        if os.environ.get("REQUIRE_PGBOUNCER") == "1":
            pytest.fail(f"{message}; REQUIRE_PGBOUNCER=1 forbids skipping")
        pytest.skip(message)
    return binary


def pgbouncer_version(binary: str) -> tuple[int, int]:
    """(major, minor) from `pgbouncer --version` ("PgBouncer 1.18.0")."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    if not match:
        raise RuntimeError(f"cannot read pgbouncer's version from {out!r}")
    return int(match.group(1)), int(match.group(2))


def run_user(host: str) -> str | None:
    """Whom pgbouncer runs as: None when we are not root (it runs as us)."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name
        if owner != "root":
            return owner
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("no unprivileged user to run pgbouncer as (tried postgres, nobody)")


def quote(value: str) -> str:
    """A value for pgbouncer's [databases] connection string."""
    if "'" in value or "\\" in value:
        raise ValueError("pgbouncer connection string values cannot hold quotes or backslashes")
    return f"'{value}'"


class PgBouncer:
    """One pgbouncer process (foreground, so that it is ours to stop), transaction pooling."""

    def __init__(
        self,
        server_url: str,
        *,
        default_pool_size: int = 4,
        max_client_conn: int = 200,
        pool_mode: str = "transaction",
        binary: str | None = None,
    ):
        self.binary = binary or require_pgbouncer()
        self.version = pgbouncer_version(self.binary)
        params = conninfo_to_dict(server_url)
        self.server_host = params.get("host") or "localhost"
        self.server_port = int(params.get("port") or 5432)
        self.login_user = params.get("user") or "postgres"
        self.server_password = params.get("password") or None
        self.default_pool_size = default_pool_size
        self.max_client_conn = max_client_conn
        self.pool_mode = pool_mode
        self.user = run_user(self.server_host)
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix="creditledger-pgbouncer-"))
        self.log_path = self.workdir / "pgbouncer.log"

    # ------------------------------------------------------------------------ configuration

    def ini_text(self, port: int) -> str:
        server = [
            f"host={quote(self.server_host)}",
            f"port={self.server_port}",
            f"user={quote(self.login_user)}",
        ]
        if self.server_password:
            server.append(f"password={quote(self.server_password)}")
        lines = [
            "[databases]",
            # The fallback entry: any database name the client asks for, on the test server
            # (every test has its own database).
            f"* = {' '.join(server)}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.workdir / 'userlist.txt'}",
            f"admin_users = {self.login_user}",
            f"pool_mode = {self.pool_mode}",
            f"default_pool_size = {self.default_pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            f"max_client_conn = {self.max_client_conn}",
            "max_db_connections = 0",
            "ignore_startup_parameters = extra_float_digits",
            "server_login_retry = 1",
            "query_wait_timeout = 60",
            "log_connections = 0",
            "log_disconnections = 0",
        ]
        if self.version >= (1, 21):
            # Supavisor's transaction mode supports no prepared statements; pgbouncer >= 1.21
            # would otherwise track them. Older pgbouncers (Debian 12 ships 1.18) never do.
            lines.append("max_prepared_statements = 0")
        return "\n".join(lines) + "\n"

    def _write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        path.chmod(0o600)
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        return path

    # ------------------------------------------------------------------------ process

    def start(self) -> PgBouncer:
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        self.workdir.chmod(0o700)
        self._write("userlist.txt", f'"{self.login_user}" ""\n')
        last_error = ""
        for _ in range(3):  # the free port may be taken between the probe and the bind
            port = free_port()
            ini = self._write("pgbouncer.ini", self.ini_text(port))
            command = [self.binary]
            if self.user:
                command += ["-u", self.user]
            command.append(str(ini))
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            if self._wait_listening(port):
                self.port = port
                return self
            last_error = self.log()
            self._terminate()
        raise RuntimeError(f"pgbouncer did not start:\n{last_error}")

    def _wait_listening(self, port: int) -> bool:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    def _terminate(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # immediate shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def stop(self):
        self._terminate()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------ addresses

    def url_for(self, db_url: str) -> str:
        """db_url's database through the pooler (trust: no password between client and pooler)."""
        dbname = conninfo_to_dict(db_url).get("dbname") or self.login_user
        return (
            f"postgresql://{quote_url(self.login_user, safe='')}@127.0.0.1:{self.port}/"
            f"{quote_url(dbname, safe='')}?sslmode=disable"
        )
