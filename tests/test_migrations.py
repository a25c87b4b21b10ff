"""`make migrate` twice is a no-op: migrations apply once, definitions re-apply to the same
catalog. The catalog is compared through pg_catalog (pg_dump is not guaranteed on PATH)."""

import json
import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from shim.migrate import DB_DIR, PROJECT_ROOT, migrate
from tests.conftest import database_url, janitor
from tests.db_helpers import snapshot

USER_SCHEMAS = "n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'"
SORTED_ACL = "(SELECT array_agg(a::text ORDER BY a::text) FROM unnest({}) AS a)"

CATALOG_QUERIES = {
    "schemas": f"""
        SELECT n.nspname, n.nspowner::regrole::text AS owner, {SORTED_ACL.format("n.nspacl")} AS acl
          FROM pg_namespace AS n WHERE {USER_SCHEMAS}""",
    "relations": f"""
        SELECT n.nspname, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity,
               c.relowner::regrole::text AS owner, {SORTED_ACL.format("c.relacl")} AS acl,
               c.reloptions
          FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE {USER_SCHEMAS}""",
    "columns": f"""
        SELECT n.nspname, c.relname, a.attnum, a.attname,
               format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull, a.attidentity,
               a.attgenerated, pg_get_expr(d.adbin, d.adrelid) AS default,
               {SORTED_ACL.format("a.attacl")} AS acl
          FROM pg_attribute AS a
          JOIN pg_class AS c ON c.oid = a.attrelid
          JOIN pg_namespace AS n ON n.oid = c.relnamespace
          LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE {USER_SCHEMAS} AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraints": f"""
        SELECT n.nspname, coalesce(co.conrelid::regclass::text, co.contypid::regtype::text) AS owner,
               co.conname, co.contype, pg_get_constraintdef(co.oid) AS definition
          FROM pg_constraint AS co JOIN pg_namespace AS n ON n.oid = co.connamespace
         WHERE {USER_SCHEMAS}""",
    "indexes": f"""
        SELECT n.nspname, ci.relname, pg_get_indexdef(i.indexrelid) AS definition
          FROM pg_index AS i JOIN pg_class AS ci ON ci.oid = i.indexrelid
          JOIN pg_namespace AS n ON n.oid = ci.relnamespace
         WHERE {USER_SCHEMAS}""",
    "triggers": f"""
        SELECT n.nspname, c.relname, t.tgname, t.tgenabled, pg_get_triggerdef(t.oid) AS definition
          FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
          JOIN pg_namespace AS n ON n.oid = c.relnamespace
         WHERE {USER_SCHEMAS} AND NOT t.tgisinternal""",
    "policies": """
        SELECT schemaname, tablename, policyname, permissive, roles::text[] AS roles, cmd,
               qual, with_check
          FROM pg_policies""",
    "functions": f"""
        SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid) AS args,
               pg_get_function_result(p.oid) AS result, md5(p.prosrc) AS body_md5, p.prolang,
               p.prokind, p.prosecdef, p.provolatile, p.proconfig,
               p.proowner::regrole::text AS owner, {SORTED_ACL.format("p.proacl")} AS acl
          FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
         WHERE {USER_SCHEMAS}""",
    "types": f"""
        SELECT n.nspname, t.typname, t.typtype, t.typrelid <> 0 AS composite,
               {SORTED_ACL.format("t.typacl")} AS acl
          FROM pg_type AS t JOIN pg_namespace AS n ON n.oid = t.typnamespace
         WHERE {USER_SCHEMAS}""",
    "default_privileges": """
        SELECT d.defaclrole::regrole::text AS role, d.defaclnamespace::regnamespace::text AS schema,
               d.defaclobjtype, (SELECT array_agg(a::text ORDER BY a::text)
                                   FROM unnest(d.defaclacl) AS a) AS acl
          FROM pg_default_acl AS d""",
    "roles": """
        SELECT rolname, rolsuper, rolinherit, rolcanlogin, rolbypassrls
          FROM pg_roles WHERE rolname IN ('anon', 'authenticated', 'service_role')""",
}


def catalog(conn) -> dict:
    """Every schema object of the database's own schemas, as sorted, comparable rows."""
    result = {}
    for name, sql in CATALOG_QUERIES.items():
        rows = conn.execute(sql).fetchall()
        result[name] = sorted(rows, key=repr)
    return result


def data(conn) -> dict:
    """The rows migrate must not touch: money, settings and yoyo's own history."""
    return {
        "money": snapshot(conn),
        "settings": conn.execute("SELECT * FROM billing.settings").fetchall(),
        "yoyo": conn.execute(
            "SELECT migration_id FROM creditledger_migrations._yoyo_migration ORDER BY 1"
        ).fetchall(),
    }


def migration_files() -> list[str]:
    return sorted(p.stem for p in (DB_DIR / "migrations").glob("*.sql"))


@pytest.fixture
def empty_db_url(server_url):
    """A brand-new database with nothing in it (not cloned from the template)."""
    name = f"creditledger_empty_{uuid.uuid4().hex[:16]}"
    with janitor(server_url, name):
        yield database_url(server_url, name)


# ---------------------------------------------------------------------------- migrate twice


def test_migrate_again_changes_nothing(db_url, db, service):
    """On a migrated database with money in it, migrate applies no migration and leaves the
    catalog and every row as they were."""
    org = uuid.uuid4()
    service.execute("SELECT api.open_wallet(%s)", (org,))
    service.execute("SELECT api.add_wallet_credits(%s, 500::bigint, 'k')", (org,))
    service.execute("SELECT api.authorize_call(%s, 'call-1', 1)", (org,))
    catalog_before, data_before = catalog(db), data(db)
    assert len(catalog_before["functions"]) > 40 and len(catalog_before["policies"]) > 10

    result = migrate(db_url)

    assert result["migrations_applied"] == 0
    assert catalog(db) == catalog_before
    assert data(db) == data_before


def test_migrate_command_twice_is_a_no_op(db_url, db):
    """`creditledger migrate` (what `make migrate` runs) reports 0 migrations on a migrated
    database and changes no catalog entry."""
    before = catalog(db)
    env = os.environ | {"DATABASE_URL": db_url}
    for _ in range(2):
        run = subprocess.run(
            [sys.executable, "-m", "shim.cli", "migrate"],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stderr
        assert json.loads(run.stdout.strip().splitlines()[-1])["migrations_applied"] == 0
    assert catalog(db) == before


def test_migrate_repairs_drifted_functions_and_policies(db_url, db):
    """Functions and policies are re-applied on every migrate: a hand-edited function body, a
    dropped policy and an unpinned search_path are restored (and the snapshot sees each)."""
    before = catalog(db)
    db.execute(
        "CREATE OR REPLACE FUNCTION billing._call_ref(p_call_id text) RETURNS text"
        " LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = '' AS $$ SELECT p_call_id $$"
    )
    db.execute("ALTER FUNCTION api.expire_holds() RESET search_path")
    db.execute("DROP POLICY member_reads_own_ledger ON billing.ledger_entries")
    drifted = catalog(db)
    assert drifted["functions"] != before["functions"]
    assert drifted["policies"] != before["policies"]

    assert migrate(db_url)["migrations_applied"] == 0
    assert catalog(db) == before


# ---------------------------------------------------------------------------- from nothing


def test_migrate_on_an_empty_database_builds_the_same_schema_twice(empty_db_url, db):
    """From nothing: every migration applies once, api.op_result has exactly the contract's
    five fields in order, a second migrate applies nothing, and the result matches the
    template every other test runs on."""
    first = migrate(empty_db_url)
    assert first["migrations_applied"] == len(migration_files()) > 0

    with psycopg.connect(empty_db_url, autocommit=True, row_factory=dict_row) as conn:
        fields = conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) AS type"
            "  FROM pg_attribute AS a JOIN pg_type AS t ON t.typrelid = a.attrelid"
            " WHERE t.oid = 'api.op_result'::regtype AND a.attnum > 0 AND NOT a.attisdropped"
            " ORDER BY a.attnum"
        ).fetchall()
        assert [(f["attname"], f["type"]) for f in fields] == [
            ("status", "text"),
            ("entry_id", "bigint"),
            ("amount_minor", "bigint"),
            ("balance_minor", "bigint"),
            ("reason", "text"),
        ]
        after_first = catalog(conn)
        applied = conn.execute(
            "SELECT migration_id FROM creditledger_migrations._yoyo_migration ORDER BY 1"
        ).fetchall()
        assert [row["migration_id"] for row in applied] == migration_files()

        second = migrate(empty_db_url)
        assert second["migrations_applied"] == 0
        assert catalog(conn) == after_first

    assert after_first == catalog(db)
