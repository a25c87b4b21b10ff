"""Function hygiene, checked in the catalog and in the source (Supabase splinter lint 0011).

Every function in api and billing pins search_path to '' (stored in proconfig as
search_path=""); nothing in api is executable by PUBLIC or anon; authenticated executes only
the client functions; SECURITY DEFINER lives in api only. Each lint is also shown to catch
the mistake it is for, so none of them can pass by accident.
"""

import re
from pathlib import Path

import pytest

from shim.migrate import DB_DIR

PINNED = 'search_path=""'
CLIENT_FUNCTIONS = {"wallet_summary", "list_transactions", "configure_auto_recharge", "begin_checkout"}

# Offenders of each lint, as (schema.function(args), detail) rows.
UNPINNED_SQL = """
SELECT p.oid::regprocedure::text AS fn, p.proconfig::text AS detail
  FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname IN ('api', 'billing')
   AND NOT (coalesce(p.proconfig, '{}') @> ARRAY[%s])
 ORDER BY 1
"""
PUBLIC_OR_ANON_SQL = """
SELECT p.oid::regprocedure::text AS fn, a.grantee::regrole::text AS detail
  FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
 CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) AS a
 WHERE n.nspname = 'api' AND a.privilege_type = 'EXECUTE' AND a.grantee = 0
UNION ALL
SELECT p.oid::regprocedure::text, 'anon'
  FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname = 'api' AND has_function_privilege('anon', p.oid, 'EXECUTE')
 ORDER BY 1
"""
AUTHENTICATED_SQL = """
SELECT p.proname AS fn, p.oid::regprocedure::text AS detail
  FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname = 'api' AND has_function_privilege('authenticated', p.oid, 'EXECUTE')
 ORDER BY 1
"""
DEFINER_OUTSIDE_API_SQL = """
SELECT p.oid::regprocedure::text AS fn, n.nspname AS detail
  FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
 WHERE n.nspname = 'billing' AND p.prosecdef
 ORDER BY 1
"""


def offenders(db, sql, params=()):
    return [(row["fn"], row["detail"]) for row in db.execute(sql, params).fetchall()]


# ---------------------------------------------------------------------------- the catalog


def test_pinned_search_path_is_stored_as_expected(db):
    """The exact proconfig entry PostgreSQL stores for SET search_path = ''."""
    db.execute(
        "CREATE FUNCTION public.lint_probe() RETURNS int LANGUAGE sql SET search_path = '' AS 'SELECT 1'"
    )
    stored = db.execute("SELECT proconfig FROM pg_proc WHERE proname = 'lint_probe'").fetchone()
    assert stored["proconfig"] == [PINNED]


def test_every_function_pins_an_empty_search_path(db):
    """Every function in api and billing declares SET search_path = ''."""
    count = db.execute(
        "SELECT count(*) AS n FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE n.nspname IN ('api', 'billing')"
    ).fetchone()["n"]
    assert count > 40
    assert offenders(db, UNPINNED_SQL, (PINNED,)) == []


def test_no_api_function_is_executable_by_public_or_anon(db):
    """No api function grants EXECUTE to PUBLIC (explicitly or by a null ACL) or to anon."""
    assert offenders(db, PUBLIC_OR_ANON_SQL) == []


def test_authenticated_executes_only_the_client_functions(db):
    """In api, authenticated may execute wallet_summary, list_transactions,
    configure_auto_recharge and begin_checkout, and nothing else."""
    assert {fn for fn, _ in offenders(db, AUTHENTICATED_SQL)} == CLIENT_FUNCTIONS


def test_security_definer_only_in_api(db):
    """billing helpers run with their caller's rights; only api functions are DEFINER."""
    assert offenders(db, DEFINER_OUTSIDE_API_SQL) == []


def test_catalog_lints_catch_their_mistakes(db):
    """A planted unpinned, PUBLIC-executable, DEFINER billing function and a stray grant to
    authenticated are each reported."""
    db.execute("CREATE FUNCTION billing.lint_bad() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1'")
    db.execute("CREATE FUNCTION api.lint_bad() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    db.execute("GRANT EXECUTE ON FUNCTION api.lint_bad() TO PUBLIC")
    db.execute("CREATE FUNCTION api.lint_anon() RETURNS int LANGUAGE sql SET search_path = '' AS 'SELECT 1'")
    db.execute("REVOKE EXECUTE ON FUNCTION api.lint_anon() FROM PUBLIC")
    db.execute("GRANT EXECUTE ON FUNCTION api.lint_anon() TO anon, authenticated")

    assert {fn for fn, _ in offenders(db, UNPINNED_SQL, (PINNED,))} == {
        "billing.lint_bad()",
        "api.lint_bad()",
    }
    public_or_anon = offenders(db, PUBLIC_OR_ANON_SQL)
    assert ("api.lint_bad()", "-") in public_or_anon  # grantee 0 (PUBLIC) shows as '-'
    assert ("api.lint_anon()", "anon") in public_or_anon
    assert {fn for fn, _ in offenders(db, AUTHENTICATED_SQL)} - CLIENT_FUNCTIONS == {"lint_bad", "lint_anon"}
    assert offenders(db, DEFINER_OUTSIDE_API_SQL) == [("billing.lint_bad()", "billing")]


# ---------------------------------------------------------------------------- the source


_CREATE_FUNCTION = re.compile(r"\bCREATE\s+(?:OR\s+REPLACE\s+)?FUNCTION\b", re.IGNORECASE)
_BODY_START = re.compile(r"\bAS\s+(\$[A-Za-z_0-9]*\$)", re.IGNORECASE)
_SEARCH_PATH = re.compile(r"\bSET\s+search_path\s*(?:=|\bTO\b)", re.IGNORECASE)


def _strip_line_comments(sql: str) -> str:
    """Drop -- comments (the db/ files keep no '--' inside string literals)."""
    return re.sub(r"--[^\n]*", "", sql)


def unpinned_functions(sql: str) -> list[str]:
    """The CREATE FUNCTION statements of a SQL text that set no search_path before their body
    ends: the header up to AS $tag$, plus whatever follows the closing $tag$ up to the ';'."""
    sql = _strip_line_comments(sql)
    found = []
    for match in _CREATE_FUNCTION.finditer(sql):
        body = _BODY_START.search(sql, match.end())
        if body is None:
            found.append(sql[match.start() : match.start() + 80].strip())
            continue
        tag = body.group(1)
        body_end = sql.find(tag, body.end())
        if body_end == -1:
            found.append(sql[match.start() : match.start() + 80].strip())
            continue
        after = sql[body_end + len(tag) :]
        statement_end = after.find(";")
        clauses = sql[match.end() : body.start()] + after[: statement_end if statement_end >= 0 else None]
        if not _SEARCH_PATH.search(clauses):
            name = re.match(r"\s*([\w.\"]+)", sql[match.end() :])
            found.append(name.group(1) if name else sql[match.start() : match.start() + 80])
    return found


def sql_files() -> list[Path]:
    files = sorted(DB_DIR.rglob("*.sql"))
    assert files, f"no SQL files under {DB_DIR}"
    return files


@pytest.mark.parametrize("path", sql_files(), ids=lambda p: str(p.relative_to(DB_DIR)))
def test_every_function_in_the_source_sets_search_path(path):
    """No CREATE FUNCTION in db/ leaves search_path to the caller (splinter lint 0011)."""
    assert unpinned_functions(path.read_text()) == []


def test_source_lint_sees_every_function_of_the_catalog(db):
    """The source lint finds at least as many CREATE FUNCTION statements as api and billing
    hold functions (a parser that found none would pass vacuously)."""
    in_source = sum(len(_CREATE_FUNCTION.findall(_strip_line_comments(p.read_text()))) for p in sql_files())
    in_catalog = db.execute(
        "SELECT count(*) AS n FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE n.nspname IN ('api', 'billing')"
    ).fetchone()["n"]
    assert in_source >= in_catalog > 40


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("CREATE FUNCTION api.f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;", ["api.f"]),
        (
            "CREATE OR REPLACE FUNCTION billing.g() RETURNS int LANGUAGE plpgsql AS $x$\n"
            "BEGIN PERFORM set_config('search_path', '', true); -- SET search_path = ''\n"
            "RETURN 1; END $x$;",
            ["billing.g"],
        ),
        ("CREATE FUNCTION api.f() RETURNS int LANGUAGE sql SET search_path = '' AS $$ SELECT 1 $$;", []),
        ("CREATE FUNCTION api.f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql SET search_path TO '';", []),
        (
            "-- CREATE FUNCTION api.commented() AS $$ $$;\n"
            "create function api.h() returns int language sql set search_path = '' as $f$ select 1 $f$;\n"
            "CREATE FUNCTION api.i() RETURNS int LANGUAGE sql AS $f$ SELECT 1 $f$;",
            ["api.i"],
        ),
    ],
)
def test_source_lint_catches_a_function_without_search_path(sql, expected):
    """The source lint flags unpinned functions, ignores a search_path mentioned only inside
    the body, and accepts SET search_path before or after the body."""
    assert unpinned_functions(sql) == expected
