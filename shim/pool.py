"""The shim's connection pool: psycopg 3 with prepared statements off, so it also runs behind a
transaction-mode pooler (Supabase's port 6543, pgbouncer), where a prepared statement may land
on another server connection."""

from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from shim.database import database_url

# How long a request waits for a connection before the shim answers 503 (the provider retries).
POOL_TIMEOUT_SECONDS = 5.0


def open_pool(url: str | None = None, max_size: int = 10) -> ConnectionPool:
    """A pool that opens lazily: the app starts even while the database is down (and answers
    503 until it is back), instead of crashing at boot."""
    return ConnectionPool(
        url or database_url(),
        min_size=1,
        max_size=max_size,
        timeout=POOL_TIMEOUT_SECONDS,
        kwargs={"autocommit": True, "prepare_threshold": None, "row_factory": dict_row},
        open=False,
        name="creditledger",
        # A connection whose server went away (a restart, pg_terminate_backend) is found at
        # checkout and replaced, instead of being handed to one request per dead backend.
        check=ConnectionPool.check_connection,
    )
