"""`make migrate`: every db/bootstrap file, yoyo migrations, then every db/functions file, then
every db/policies file."""

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from yoyo import get_backend, read_migrations

from shim.database import PROJECT_ROOT, connect, database_url

DB_DIR = PROJECT_ROOT / "db"
# Any stable 64-bit number: serialises concurrent `make migrate` runs (transaction-scoped, so it
# is also safe behind a transaction pooler).
MIGRATE_LOCK_KEY = 0x6372656469746C67
# Where yoyo keeps its history and lock: a schema no API role can enter (public is exposed by
# PostgREST and open to anon by Supabase's default privileges). db/bootstrap creates it.
BOOKKEEPING_SCHEMA = "creditledger_migrations"


def yoyo_url(url: str) -> str:
    """yoyo picks its driver from the scheme (psycopg 3 is `postgresql+psycopg`) and takes its
    schema from the `schema` parameter: its postgres backend sets the connection's search_path to
    it, so its tables are created and read there. Our migrations qualify every name, so they are
    unaffected (an unqualified CREATE would land in that schema, which the security-model test
    would report)."""
    scheme, rest = url.split("://", 1)
    if scheme in ("postgres", "postgresql"):
        scheme = "postgresql+psycopg"
    parts = urlsplit(f"{scheme}://{rest}")
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"] + [("schema", BOOKKEEPING_SCHEMA)]
    return urlunsplit(parts._replace(query=urlencode(query)))


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
