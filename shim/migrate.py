"""`make migrate`: every db/bootstrap file, yoyo migrations, then every db/functions file, then
every db/policies file."""

from pathlib import Path

import psycopg
from yoyo import get_backend, read_migrations

from shim.database import PROJECT_ROOT, connect, database_url

DB_DIR = PROJECT_ROOT / "db"
# Any stable 64-bit number: serialises concurrent `make migrate` runs (transaction-scoped, so it
# is also safe behind a transaction pooler).
MIGRATE_LOCK_KEY = 0x6372656469746C67


def yoyo_url(url: str) -> str:
    """yoyo picks its driver from the scheme; psycopg 3 is `postgresql+psycopg`."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else url


def sql_files(folder: str) -> list[Path]:
    """The files of one folder in name order: their numeric prefixes are the apply order."""
    return sorted((DB_DIR / folder).glob("*.sql"))


def apply_bootstrap(conn: psycopg.Connection) -> int:
    """What must hold before yoyo connects, in one transaction: on plain PostgreSQL, Supabase's
    roles and default privileges (yoyo's own tables are created under them)."""
    files = sql_files("bootstrap")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK_KEY,))
        for path in files:
            conn.execute(path.read_text())
    return len(files)


def apply_migrations(url: str) -> int:
    """Apply pending yoyo migrations; return how many ran."""
    backend = get_backend(yoyo_url(url))
    try:
        migrations = read_migrations(str(DB_DIR / "migrations"))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return len(pending)
    finally:
        backend.connection.close()


def apply_definitions(conn: psycopg.Connection) -> int:
    """Re-apply functions then policies in one transaction: all of them, or none."""
    files = sql_files("functions") + sql_files("policies")
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK_KEY,))
        for path in files:
            conn.execute(path.read_text())
    return len(files)


def migrate(url: str | None = None) -> dict:
    """Bring the database at `url` to the current schema; running it twice changes nothing."""
    url = url or database_url()
    with connect(url, autocommit=True) as conn:
        apply_bootstrap(conn)
    ran = apply_migrations(url)
    with connect(url, autocommit=True) as conn:
        definitions = apply_definitions(conn)
    return {"migrations_applied": ran, "definition_files": definitions}
