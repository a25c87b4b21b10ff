"""What anon and authenticated can do, on a database built as Supabase builds one.

The test server is made to look like a Supabase project before anything is migrated
(db/bootstrap/10_supabase_platform.sql: its roles, authenticator, and the default privileges that
open every new table, sequence and function in public to the API roles). Then:

- every schema, table, view, materialized view, sequence and function outside PostgreSQL's own
  schemas is enumerated, and what anon and authenticated may do with each must be exactly the
  README's "Security model" table (parsed from README.md: the table is the one source);
- the same is tried for real, logged in as authenticator and switched to anon or authenticated
  the way PostgREST does per request: everything the table does not grant fails with 42501;
- yoyo's bookkeeping is the migration owner's alone, an earlier release's bookkeeping in public
  is moved there by `make migrate` with all of its history, and anon can neither erase it nor
  take /healthz down.
"""

import contextlib
import json
import re
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row
from yoyo import get_backend, read_migrations

from shim.migrate import BOOKKEEPING_SCHEMA, DB_DIR, PROJECT_ROOT, migrate, sql_files
from shim.ops import EXPECTED_MIGRATIONS

ROLES = ("anon", "authenticated")
YOYO_TABLES = {"_yoyo_migration", "_yoyo_log", "_yoyo_version", "yoyo_lock"}
# The schemas PostgREST serves: Supabase's defaults (public, graphql_public) and ours (api).
EXPOSED_SCHEMAS = {"public", "graphql_public", "api"}
KINDS = ("schema", "table", "sequence", "function")
# PostgreSQL's own schemas are not ours to model (anon executes most of pg_catalog, as on any
# PostgreSQL); every other schema of the database is enumerated, including ones nobody expects.
OWN_SCHEMAS = r"""n.nspname NOT IN ('pg_catalog', 'information_schema')
                  AND n.nspname !~ '^pg_(toast|temp_|toast_temp_)'"""

# Every privilege each role holds on every object, with names as regclass / regprocedure print
# them under an empty search_path (so always schema-qualified). SELECT, INSERT, UPDATE and
# REFERENCES are asked of any column, so a column-level grant is seen too (and named apart).
ACTUAL_PRIVILEGES_SQL = f"""
WITH roles(role) AS (SELECT unnest(%(roles)s::text[])),
schemas AS (SELECT n.oid, n.nspname FROM pg_catalog.pg_namespace AS n WHERE {OWN_SCHEMAS}),
relations AS (
  SELECT c.oid, c.relkind FROM pg_catalog.pg_class AS c JOIN schemas AS n ON n.oid = c.relnamespace
   WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S'))
SELECT r.role, p.privilege, 'schema' AS kind, pg_catalog.quote_ident(s.nspname) AS object
  FROM roles AS r, schemas AS s, unnest(ARRAY['USAGE', 'CREATE']) AS p(privilege)
 WHERE pg_catalog.has_schema_privilege(r.role, s.oid, p.privilege)
UNION ALL
SELECT r.role,
       CASE WHEN pg_catalog.has_table_privilege(r.role, c.oid, p.privilege) THEN p.privilege
            ELSE p.privilege || ' (columns)' END,
       'table', c.oid::regclass::text
  FROM roles AS r, relations AS c, unnest(%(table_privileges)s::text[]) AS p(privilege)
 WHERE c.relkind <> 'S'
   AND CASE WHEN p.privilege IN ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')
            THEN pg_catalog.has_any_column_privilege(r.role, c.oid, p.privilege)
            ELSE pg_catalog.has_table_privilege(r.role, c.oid, p.privilege) END
UNION ALL
SELECT r.role, p.privilege, 'sequence', c.oid::regclass::text
  FROM roles AS r, relations AS c, unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) AS p(privilege)
 WHERE c.relkind = 'S' AND pg_catalog.has_sequence_privilege(r.role, c.oid, p.privilege)
UNION ALL
SELECT r.role, 'EXECUTE', 'function', f.oid::regprocedure::text
  FROM roles AS r, pg_catalog.pg_proc AS f JOIN schemas AS n ON n.oid = f.pronamespace
 WHERE pg_catalog.has_function_privilege(r.role, f.oid, 'EXECUTE')
"""

TABLE_PRIVILEGES = ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"]


# ---------------------------------------------------------------------------- the README's table


def readme_model(text: str) -> set[tuple[str, str, str, str]]:
    """The README's security model as (role, privilege, kind, object) rows: the first table under
    the "## Security model" heading, one row per role, privilege and kind of object; every
    backticked name in its last column is one object (prose outside backticks is commentary)."""
    section = re.search(r"^## Security model\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Security model' section"
    rows = [line for line in section.group(1).splitlines() if line.startswith("|")]
    assert len(rows) > 2, "the Security model section has no table"
    header = [cell.strip().lower() for cell in rows[0].strip("|").split("|")]
    assert header == ["role", "privilege", "on", "objects"], header
    model = set()
    for line in rows[2:]:
        role, privilege, kind, objects = (cell.strip() for cell in line.strip().strip("|").split("|"))
        role, privilege = role.strip("`"), privilege.strip("`")
        assert role in ROLES and kind in KINDS, line
        names = re.findall(r"`([^`]+)`", objects)
        assert names, line
        model |= {(role, privilege, kind, name) for name in names}
    return model


@pytest.fixture(scope="module")
def model() -> set[tuple[str, str, str, str]]:
    return readme_model((PROJECT_ROOT / "README.md").read_text())


def actual_model(conn) -> set[tuple[str, str, str, str]]:
    """What anon and authenticated hold in this database, by has_*_privilege."""
    version = conn.execute("SELECT current_setting('server_version_num')::int AS v").fetchone()["v"]
    # PostgreSQL 17 (which Supabase runs) adds MAINTAIN: it must be refused too.
    table_privileges = TABLE_PRIVILEGES + (["MAINTAIN"] if version >= 170000 else [])
    with conn.transaction():
        conn.execute("SET LOCAL search_path = ''")
        rows = conn.execute(
            ACTUAL_PRIVILEGES_SQL, {"roles": list(ROLES), "table_privileges": table_privileges}
        ).fetchall()
    return {(r["role"], r["privilege"], r["kind"], r["object"]) for r in rows}


def test_the_readme_table_is_read(model):
    """The parser sees both roles and every kind of grant the model has (an empty parse would
    make the comparison below meaningless)."""
    assert {role for role, *_ in model} == set(ROLES)
    assert {kind for _, _, kind, _ in model} == {"schema", "table", "function"}
    assert ("anon", "USAGE", "schema", "public") in model


def test_the_readme_parser_rejects_a_table_it_cannot_read():
    """A row naming an unknown role or kind, or no object, fails the parse instead of being
    skipped."""
    head = "## Security model\n\n| role | privilege | on | objects |\n|---|---|---|---|\n"
    assert readme_model(head + "| `anon` | `USAGE` | schema | `public`, `auth` |\n\n## Next\n") == {
        ("anon", "USAGE", "schema", "public"),
        ("anon", "USAGE", "schema", "auth"),
    }
    for bad in ("| `postgres` | `USAGE` | schema | `public` |", "| `anon` | `USAGE` | type | `x` |"):
        with pytest.raises(AssertionError):
            readme_model(head + bad + "\n\n## Next\n")
    with pytest.raises(AssertionError):
        readme_model(head + "| `anon` | `USAGE` | schema | nothing |\n\n## Next\n")


def test_privileges_are_exactly_the_readmes_security_model(db, model):
    """Every privilege anon and authenticated hold on any schema, table, view, materialized
    view, sequence or function after `make migrate` is in the README's table, and every row of
    the table holds."""
    actual = actual_model(db)
    assert {
        "granted but not in the README": sorted(actual - model),
        "in the README but not granted": sorted(model - actual),
    } == {"granted but not in the README": [], "in the README but not granted": []}


def test_the_enumeration_sees_a_new_grant_anywhere(db, model):
    """A table made in a schema of its own and granted to anon, or a function left executable by
    PUBLIC in api, shows up in the comparison (the enumeration covers every schema)."""
    db.execute("CREATE SCHEMA stray")
    db.execute("GRANT USAGE ON SCHEMA stray TO anon")
    db.execute("CREATE TABLE stray.t (x int)")
    db.execute("GRANT SELECT (x) ON stray.t TO anon")
    db.execute("CREATE FUNCTION api.stray() RETURNS int LANGUAGE sql SET search_path = '' AS $$ SELECT 1 $$")
    db.execute("GRANT EXECUTE ON FUNCTION api.stray() TO PUBLIC")
    extra = actual_model(db) - model
    assert extra == {
        ("anon", "USAGE", "schema", "stray"),
        ("anon", "SELECT (columns)", "table", "stray.t"),
        ("anon", "EXECUTE", "function", "api.stray()"),
        ("authenticated", "EXECUTE", "function", "api.stray()"),
    }


# ---------------------------------------------------------------------------- as PostgREST does it


@contextlib.contextmanager
def authenticator(db_url: str):
    """A connection whose session user is authenticator, as PostgREST's pool holds. A real login
    where the server lets it log in without a password (the embedded server trusts its private
    socket); elsewhere (a password-only server such as CI's PostgreSQL 15) the superuser becomes
    authenticator for the session, which leaves exactly authenticator's rights."""
    try:
        conn = psycopg.connect(db_url, user="authenticator", autocommit=True, row_factory=dict_row)
    except psycopg.OperationalError:
        conn = psycopg.connect(db_url, autocommit=True, row_factory=dict_row)
        conn.execute("SET SESSION AUTHORIZATION authenticator")
    with conn:
        assert conn.execute("SELECT session_user AS u").fetchone()["u"] == "authenticator"
        yield conn


def attempt(conn, role: str, sql: str, commit: bool = False) -> str | None:
    """Run one statement as PostgREST runs a request for `role` (a transaction, SET LOCAL ROLE,
    the JWT's claims); return the SQLSTATE it failed with, or None. Rolled back unless commit."""
    claims = json.dumps({"role": role, "sub": str(uuid.uuid4())})
    try:
        with conn.transaction(force_rollback=not commit):
            conn.execute(
                "SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                (role, claims),
            )
            conn.execute(sql)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def objects(db) -> dict[str, list[dict]]:
    """Every relation and function of the database's own schemas, with what a probe needs."""
    with db.transaction():
        db.execute("SET LOCAL search_path = ''")
        relations = db.execute(
            f"""SELECT c.oid::regclass::text AS name, c.relkind
                  FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
                 WHERE {OWN_SCHEMAS} AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') ORDER BY 1"""
        ).fetchall()
        functions = db.execute(
            f"""SELECT f.oid::regprocedure::text AS signature,
                       pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(f.proname) AS name,
                       f.prokind, f.provariadic <> 0 AS variadic,
                       ARRAY(SELECT pg_catalog.format_type(t, NULL)
                               FROM unnest(f.proargtypes) WITH ORDINALITY AS a(t, i) ORDER BY i) AS args
                  FROM pg_proc AS f JOIN pg_namespace AS n ON n.oid = f.pronamespace
                 WHERE {OWN_SCHEMAS} ORDER BY 1"""
        ).fetchall()
    return {"relations": relations, "functions": functions}


def relation_probes(relation: dict) -> dict[str, str]:
    """Statements that need one privilege each and change nothing that a rollback keeps."""
    name = relation["name"]
    if relation["relkind"] == "S":
        return {"SELECT": f"SELECT * FROM {name}", "USAGE": f"SELECT nextval('{name}')"}
    probes = {"SELECT": f"SELECT * FROM {name} LIMIT 0"}
    if relation["relkind"] in ("r", "p"):
        probes |= {
            "INSERT": f"INSERT INTO {name} DEFAULT VALUES",
            "DELETE": f"DELETE FROM {name} WHERE false",
            "TRUNCATE": f"TRUNCATE {name}",
        }
    return probes


def call(function: dict) -> str:
    """A call with a typed NULL for every argument: refused at lookup or at the EXECUTE check
    before the body runs, when the role may not."""
    args = [f"NULL::{t}" for t in function["args"]]
    if function["variadic"]:
        args[-1] = f"VARIADIC {args[-1]}[]" if not args[-1].endswith("[]") else f"VARIADIC {args[-1]}"
    verb = "CALL" if function["prokind"] == "p" else "SELECT"
    return f"{verb} {function['name']}({', '.join(args)})"


@pytest.mark.parametrize("role", ROLES)
def test_through_authenticator_everything_the_readme_does_not_grant_is_refused(db, db_url, model, role):
    """Logged in as authenticator and switched to the role per request: reading, inserting,
    deleting and truncating every table, reading and advancing every sequence, and calling every
    function fail with 42501 unless the README grants it; what it grants to read, reads. Functions
    the README grants are not called here (a call may move money); has_function_privilege covers
    them above, and anon's (auth.uid(), auth.jwt()) are called."""
    found = objects(db)
    assert len(found["relations"]) > 20 and len(found["functions"]) > 40
    wrong = []
    with authenticator(db_url) as conn:
        for relation in found["relations"]:
            kind = "sequence" if relation["relkind"] == "S" else "table"
            for privilege, sql in relation_probes(relation).items():
                granted = (role, privilege, kind, relation["name"]) in model
                outcome = attempt(conn, role, sql)
                if (outcome == "42501") == granted or (granted and privilege == "SELECT" and outcome):
                    wrong.append((sql, "granted" if granted else "refused", outcome))
        for function in found["functions"]:
            granted = (role, "EXECUTE", "function", function["signature"]) in model
            if granted and role != "anon":
                continue
            outcome = attempt(conn, role, call(function))
            if (outcome == "42501") == granted:
                wrong.append((call(function), "granted" if granted else "refused", outcome))
    assert wrong == []


def test_authenticator_holds_nothing_until_it_switches_role(db, db_url):
    """authenticator is NOINHERIT: logged in, it reads no table and calls no api function of its
    own; it may become anon, authenticated or service_role, and never supabase_admin."""
    with authenticator(db_url) as conn:
        assert conn.execute("SELECT current_user AS u").fetchone()["u"] == "authenticator"
        for sql in ("SELECT * FROM billing.wallets LIMIT 0", "SELECT api.expire_holds()"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
        for role in ("anon", "authenticated", "service_role"):
            conn.execute(f"SET ROLE {role}")
            conn.execute("RESET ROLE")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET ROLE supabase_admin")


# ---------------------------------------------------------------------------- the Supabase stand-in


def test_the_owner_s_new_objects_in_public_are_open_to_the_api_roles(db):
    """The stand-in reproduces Supabase's default privileges: a table the migration owner
    creates in public gets every privilege for anon, authenticated and service_role (the check
    supabase/postgres makes in migrations/tests/database/privs.sql), as do a sequence and a
    function; in a schema of its own, none of them holds anything, nor in graphql_public (whose
    default privileges are supabase_admin's only)."""
    db.execute("CREATE TABLE public.test_priv ()")
    db.execute("CREATE SEQUENCE public.test_seq")
    db.execute(
        "CREATE FUNCTION public.test_fn() RETURNS int LANGUAGE sql SET search_path = '' AS $$ SELECT 1 $$"
    )
    db.execute("CREATE SCHEMA own")
    db.execute("CREATE TABLE own.t ()")
    db.execute("CREATE TABLE graphql_public.t ()")
    for role in ("anon", "authenticated", "service_role"):
        row = db.execute(
            "SELECT has_schema_privilege(%(r)s, 'public', 'USAGE') AS usage,"
            "       has_schema_privilege(%(r)s, 'public', 'CREATE') AS create,"
            "       array(SELECT p FROM unnest(%(privs)s::text[]) AS p"
            "              WHERE has_table_privilege(%(r)s, 'public.test_priv', p)) AS table,"
            "       array(SELECT p FROM unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) AS p"
            "              WHERE has_sequence_privilege(%(r)s, 'public.test_seq', p)) AS seq,"
            "       has_function_privilege(%(r)s, 'public.test_fn()', 'EXECUTE') AS fn,"
            "       has_schema_privilege(%(r)s, 'own', 'USAGE') AS own_usage,"
            "       has_table_privilege(%(r)s, 'own.t', 'SELECT') AS own_select,"
            "       has_table_privilege(%(r)s, 'graphql_public.t', 'SELECT') AS graphql_select",
            {"r": role, "privs": TABLE_PRIVILEGES},
        ).fetchone()
        assert row == {
            "usage": True,
            "create": False,
            "table": TABLE_PRIVILEGES,
            "seq": ["USAGE", "SELECT", "UPDATE"],
            "fn": True,
            "own_usage": False,
            "own_select": False,
            "graphql_select": False,
        }, role


def test_the_stand_in_leaves_a_real_supabase_project_alone(server_url, template_name):
    """Where supabase_admin is the platform's (not our stand-in), the bootstrap creates no
    default privilege and no schema in a fresh database: tried in a transaction that gives the
    role another comment and is rolled back (the template's migrate created the stand-in)."""
    from tests.conftest import database_url, janitor

    name = f"creditledger_bare_{uuid.uuid4().hex[:16]}"
    platform = DB_DIR / "bootstrap" / "10_supabase_platform.sql"
    with (
        janitor(server_url, name),
        psycopg.connect(database_url(server_url, name), row_factory=dict_row) as conn,
    ):
        conn.execute("COMMENT ON ROLE supabase_admin IS 'Supabase super admin'")
        conn.execute(platform.read_text())
        defaults = conn.execute("SELECT count(*) AS n FROM pg_default_acl").fetchone()["n"]
        schemas = conn.execute(
            "SELECT count(*) AS n FROM pg_namespace WHERE nspname IN ('extensions', 'graphql_public')"
        ).fetchone()["n"]
        conn.rollback()
        assert (defaults, schemas) == (0, 0)
        # and without the platform's comment the same file does build the stand-in
        conn.execute(platform.read_text())
        assert conn.execute("SELECT count(*) AS n FROM pg_default_acl").fetchone()["n"] > 0
        conn.rollback()


# ---------------------------------------------------------------------------- yoyo's bookkeeping


def test_migration_bookkeeping_is_the_migration_owner_s_alone(db):
    """yoyo's four tables exist once, in creditledger_migrations, a schema no API exposes; the
    schema and each table grant nothing to anyone but their owner (PUBLIC included), so no API
    role, nor authenticator, can enter it."""
    tables = db.execute(
        "SELECT n.nspname, c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE c.relname = ANY(%s) AND c.relkind = 'r' ORDER BY 2",
        (list(YOYO_TABLES),),
    ).fetchall()
    assert {(t["nspname"], t["relname"]) for t in tables} == {(BOOKKEEPING_SCHEMA, t) for t in YOYO_TABLES}
    assert BOOKKEEPING_SCHEMA not in EXPOSED_SCHEMAS
    foreign_grants = db.execute(
        "SELECT 'schema' AS on, a.grantee::regrole::text AS grantee, a.privilege_type"
        "  FROM pg_namespace AS n, aclexplode(n.nspacl) AS a"
        " WHERE n.nspname = %(s)s AND a.grantee <> n.nspowner"
        " UNION ALL "
        "SELECT c.relname, a.grantee::regrole::text, a.privilege_type"
        "  FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace, aclexplode(c.relacl) AS a"
        " WHERE n.nspname = %(s)s AND a.grantee <> c.relowner",
        {"s": BOOKKEEPING_SCHEMA},
    ).fetchall()
    assert foreign_grants == []
    for role in ("anon", "authenticated", "service_role", "authenticator"):
        assert not db.execute(
            "SELECT has_schema_privilege(%s, %s, 'USAGE') AS ok", (role, BOOKKEEPING_SCHEMA)
        ).fetchone()["ok"]


def test_anon_cannot_erase_the_migration_history_and_healthz_stays_up(db, db_url, client):
    """Regression (issue 12, item 6): with the anon key, through authenticator, deleting yoyo's
    history (where it was, in public, and where it is), truncating it, taking yoyo's lock, or
    reading it through the shim's function are all refused; committed as PostgREST commits, the
    history is intact and /healthz still answers 200."""
    attacks = [
        "DELETE FROM public._yoyo_migration",
        f"DELETE FROM {BOOKKEEPING_SCHEMA}._yoyo_migration",
        f"TRUNCATE {BOOKKEEPING_SCHEMA}._yoyo_log",
        f"INSERT INTO {BOOKKEEPING_SCHEMA}.yoyo_lock (locked, ctime, pid) VALUES (1, now(), 1)",
        "SELECT api.schema_migrations_applied(ARRAY['0001_supabase_bootstrap'])",
    ]
    with authenticator(db_url) as conn:
        outcomes = {
            (role, sql): attempt(conn, role, sql, commit=True)
            for role in ("anon", "authenticated")
            for sql in attacks
        }
    # public._yoyo_migration no longer exists (42P01); everything else is refused (42501).
    assert outcomes == {key: "42P01" if "public." in key[1] else "42501" for key in outcomes}
    history = db.execute(
        f"SELECT migration_id FROM {BOOKKEEPING_SCHEMA}._yoyo_migration ORDER BY 1"
    ).fetchall()
    assert [row["migration_id"] for row in history] == EXPECTED_MIGRATIONS
    answer = client.get("/healthz")
    assert (answer.status_code, answer.get_json()["migrations_applied"]) == (200, len(EXPECTED_MIGRATIONS))


def test_healthz_is_503_while_a_migration_is_pending(db, client):
    """The history /healthz reads through api.schema_migrations_applied is the real one: a
    missing migration makes it 503 migrations_pending."""
    db.execute(
        f"DELETE FROM {BOOKKEEPING_SCHEMA}._yoyo_migration WHERE migration_id = %s",
        (EXPECTED_MIGRATIONS[-1],),
    )
    answer = client.get("/healthz")
    assert answer.status_code == 503
    assert answer.get_json() == {
        "database": "ok",
        "status": "migrations_pending",
        "migrations_applied": len(EXPECTED_MIGRATIONS) - 1,
        "migrations_expected": len(EXPECTED_MIGRATIONS),
    }


def test_healthz_is_503_on_a_database_this_release_has_not_migrated(db, client):
    """A shim deployed before `make migrate` ran finds no api.schema_migrations_applied: it
    says migrations_pending (503) instead of failing with a 500."""
    db.execute("DROP FUNCTION api.schema_migrations_applied(text[])")
    answer = client.get("/healthz")
    assert (answer.status_code, answer.get_json()["status"]) == (503, "migrations_pending")


# ---------------------------------------------------------------------------- the upgrade path


def earlier_release_yoyo(url: str):
    """yoyo as releases before this one ran it: no schema parameter, so its tables go to
    public, under public's default privileges."""
    return get_backend("postgresql+psycopg://" + url.split("://", 1)[1])


def history(conn, schema: str) -> dict[str, list]:
    """Every row of yoyo's history tables in one schema."""
    return {
        table: conn.execute(f"SELECT * FROM {schema}.{table} ORDER BY 1, 2").fetchall()
        for table in ("_yoyo_migration", "_yoyo_log", "_yoyo_version")
    }


def yoyo_tables_in(conn, schema: str) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (schema, list(YOYO_TABLES)),
    ).fetchall()
    return {row["relname"] for row in rows}


@pytest.fixture
def empty_db(server_url):
    """A brand-new database (not from the template) and a superuser connection to it."""
    from tests.conftest import database_url, janitor

    name = f"creditledger_upgrade_{uuid.uuid4().hex[:16]}"
    with janitor(server_url, name):
        url = database_url(server_url, name)
        with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
            yield url, conn


def test_migrate_moves_an_earlier_release_s_bookkeeping_out_of_public(empty_db):
    """A deployment migrated by an earlier release has yoyo's tables in public, open to anon.
    `make migrate` moves all four into creditledger_migrations with every row, applies nothing
    again, leaves nothing of yoyo in public and nothing for anon; a second run changes nothing."""
    url, conn = empty_db
    conn.execute((DB_DIR / "bootstrap" / "10_supabase_platform.sql").read_text())  # the platform
    backend = earlier_release_yoyo(url)
    try:
        with backend.lock():
            backend.apply_migrations(backend.to_apply(read_migrations(str(DB_DIR / "migrations"))))
    finally:
        backend.connection.close()
    assert yoyo_tables_in(conn, "public") == YOYO_TABLES
    assert conn.execute(
        "SELECT has_table_privilege('anon', 'public._yoyo_migration', 'DELETE') AS ok"
    ).fetchone()["ok"]
    before = history(conn, "public")
    assert len(before["_yoyo_migration"]) == len(EXPECTED_MIGRATIONS)

    assert migrate(url)["migrations_applied"] == 0
    assert yoyo_tables_in(conn, "public") == set()
    assert yoyo_tables_in(conn, BOOKKEEPING_SCHEMA) == YOYO_TABLES
    assert history(conn, BOOKKEEPING_SCHEMA) == before
    assert not conn.execute(
        f"SELECT has_table_privilege('anon', '{BOOKKEEPING_SCHEMA}._yoyo_migration', 'SELECT') AS ok"
    ).fetchone()["ok"]
    conn.execute("SET ROLE service_role")
    assert conn.execute("SELECT api.schema_migrations_applied(%s) AS n", (EXPECTED_MIGRATIONS,)).fetchone()[
        "n"
    ] == len(EXPECTED_MIGRATIONS)
    conn.execute("RESET ROLE")

    assert migrate(url)["migrations_applied"] == 0
    assert history(conn, BOOKKEEPING_SCHEMA) == before


def test_migrate_merges_a_history_an_earlier_release_began_again_in_public(db_url, db):
    """An earlier release's migrate run after the move finds no tables in public and starts a
    history there. The next migrate keeps every row of it the moved history lacks (its log
    entries), keeps the moved rows as they were, and drops the copy."""
    moved = history(db, BOOKKEEPING_SCHEMA)
    backend = earlier_release_yoyo(db_url)
    try:
        first = [m for m in read_migrations(str(DB_DIR / "migrations")) if m.id == EXPECTED_MIGRATIONS[0]]
        backend.mark_migrations(first)
    finally:
        backend.connection.close()
    restarted = history(db, "public")
    assert [row["migration_id"] for row in restarted["_yoyo_migration"]] == [EXPECTED_MIGRATIONS[0]]

    assert migrate(db_url)["migrations_applied"] == 0
    assert yoyo_tables_in(db, "public") == set()
    merged = history(db, BOOKKEEPING_SCHEMA)
    assert merged["_yoyo_migration"] == moved["_yoyo_migration"]
    assert merged["_yoyo_version"] == moved["_yoyo_version"]
    assert sorted(merged["_yoyo_log"], key=repr) == sorted(
        moved["_yoyo_log"] + restarted["_yoyo_log"], key=repr
    )


def test_migrate_waits_for_an_earlier_release_holding_its_lock_in_public(db_url, db):
    """A row in public.yoyo_lock is an earlier release's migrate at work: migrate refuses to
    move the table under it (55P03, nothing changed) and moves it once the lock is released."""
    backend = earlier_release_yoyo(db_url)  # creates public.yoyo_lock
    backend.connection.close()
    db.execute("INSERT INTO public.yoyo_lock (locked, ctime, pid) VALUES (1, now(), 4242)")
    with pytest.raises(psycopg.errors.LockNotAvailable):
        migrate(db_url)
    assert yoyo_tables_in(db, "public") == {"yoyo_lock"}
    db.execute("DELETE FROM public.yoyo_lock")
    assert migrate(db_url)["migrations_applied"] == 0
    assert yoyo_tables_in(db, "public") == set()


def test_every_bootstrap_file_is_applied_before_yoyo():
    """The bootstrap folder holds the Supabase stand-in and the bookkeeping move, in that
    order (the move revokes from roles the stand-in creates)."""
    assert [p.name for p in sql_files("bootstrap")] == [
        "10_supabase_platform.sql",
        "20_migration_bookkeeping.sql",
    ]


def test_yoyo_keeps_the_default_search_path_so_a_transaction_pooler_cannot_misplace_its_tables(db_url):
    """yoyo's connection sets no session state (yoyo's own `schema` parameter would SET
    search_path, which a transaction pooler such as Supabase's port 6543 drops between
    transactions): its four tables are named with their schema instead, and its migrations
    resolve names exactly as any other connection does."""
    from shim.migrate import yoyo_backend

    backend = yoyo_backend(db_url)
    try:
        search_path = backend.execute("SHOW search_path").fetchone()[0]
        names = {backend.migration_table_quoted, backend.log_table_quoted, backend.lock_table_quoted}
        names.add(backend.quote_identifier(backend.version_table))  # how yoyo reads its version
        listed = set(backend.list_tables())
    finally:
        backend.connection.close()
    with psycopg.connect(db_url) as plain:
        assert search_path == plain.execute("SHOW search_path").fetchone()[0]
    assert names == {f'"{BOOKKEEPING_SCHEMA}"."{t}"' for t in YOYO_TABLES}
    assert listed == YOYO_TABLES
