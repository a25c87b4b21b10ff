"""Where the database is: DATABASE_URL, or an embedded PostgreSQL kept in the project's .pgdata/."""

import os
import warnings
from pathlib import Path

import psycopg

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DATA_DIR = PROJECT_ROOT / ".pgdata"


def embedded_url(data_dir: Path = EMBEDDED_DATA_DIR) -> str:
    """Start (or reuse) the embedded server and return its URL.

    pgserver ships PostgreSQL binaries in a wheel and runs as root, which pg_ctl refuses to do.
    The server outlives this process (cleanup_mode=None) so that `make migrate` and `make serve`
    share it; it listens on a Unix socket inside data_dir only.
    """
    # pgserver asks platformdirs for a runtime dir, which containers and CI do not set: noise.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pgserver

    server = pgserver.get_server(str(data_dir), cleanup_mode=None)
    return server.get_uri()


def database_url() -> str:
    """The URL every command uses: DATABASE_URL when set, else the embedded server."""
    return os.environ.get("DATABASE_URL") or embedded_url()


def connect(url: str | None = None, **kwargs) -> psycopg.Connection:
    """One connection, prepared statements off so it also works behind a transaction pooler."""
    kwargs.setdefault("prepare_threshold", None)
    return psycopg.connect(url or database_url(), **kwargs)
