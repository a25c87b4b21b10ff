"""`make migrate`: every db/bootstrap file, yoyo migrations, then every db/functions file, then
every db/policies file."""

from pathlib import Path

import psycopg
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri
from yoyo.migrations import default_migration_table

from shim.database import PROJECT_ROOT, connect, database_url

DB_DIR = PROJECT_ROOT / "db"
# Any stable 64-bit number: serialises concurrent `make migrate` runs (transaction-scoped, so it
# is also safe behind a transaction pooler).
MIGRATE_LOCK_KEY = 0x6372656469746C67
# Where yoyo keeps its history and lock: a schema no API role can enter (public is exposed by
# PostgREST and open to anon by Supabase's default privileges). db/bootstrap creates it.
BOOKKEEPING_SCHEMA = "creditledger_migrations"


def yoyo_url(url: str) -> str:
    """yoyo picks its driver from the scheme; psycopg 3 is `postgresql+psycopg`."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgres", "postgresql") else url


class BookkeepingBackend(PostgresqlPsycopgBackend):
    """yoyo's psycopg 3 backend with its four tables in BOOKKEEPING_SCHEMA.

    yoyo's own `schema` URL parameter would do it with a session-level SET search_path, which
    a transaction pooler does not keep between transactions (yoyo could then start a fresh
    history in public half-way) and which would change how our migrations resolve names. yoyo
    names its tables only through quote_identifier (directly or as `*_table_quoted`) and finds
    them with list_tables, so qualifying the four names there is enough."""

    def quote_identifier(self, s: str) -> str:
        quoted = super().quote_identifier(s)
        bookkeeping = {self.migration_table, self.log_table, self.version_table, self.lock_table}
        return f"{super().quote_identifier(BOOKKEEPING_SCHEMA)}.{quoted}" if s in bookkeeping else quoted

    def list_tables(self, **kwargs) -> list[str]:
        cursor = self.execute(self.list_tables_sql, {"schema": BOOKKEEPING_SCHEMA})
        return [row[0] for row in cursor.fetchall()]


def yoyo_backend(url: str) -> BookkeepingBackend:
    """What yoyo.get_backend builds, with our backend class."""
    backend = BookkeepingBackend(parse_uri(yoyo_url(url)), default_migration_table)
    backend.init_database()
    return backend


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
    backend = yoyo_backend(url)
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
