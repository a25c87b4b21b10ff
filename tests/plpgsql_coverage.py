"""PL/pgSQL statement coverage for the test suite, from plpgsql_check's profiler.

Load it with `-p tests.plpgsql_coverage` (CI's PostgreSQL 15 leg does; `make test` alone does not).
It needs a server started with `shared_preload_libraries = 'plpgsql_check'` and
`plpgsql_check.profiler = on`, and the plpgsql_check extension installable there. Anywhere else it
reports that coverage is unavailable and changes nothing.

Why it works the way it does: plpgsql_check keeps each function's profile in shared memory under
the key (function oid, *database oid*, xmin and tid of the pg_proc row), and its reader functions
(`plpgsql_profiler_function_statements_tb`, `plpgsql_coverage_statements`) look up the profile of
the database they run in. Every test runs in its own database cloned from a template, and the clone
is dropped afterwards, so a single read at the end of the session would see nothing. Instead this
plugin wraps pytest-postgresql's `DatabaseJanitor.drop`: just before a test database is dropped it
connects to it, creates the extension there, reads every statement of every PL/pgSQL function in
the schemas `api` and `billing` with its execution count, adds that to a session-wide union, and
resets those profiles (so shared memory never fills up over a long run). The template's own drop at
the end of the session supplies the canonical list of functions and statements; statements are
matched across databases by function signature, md5 of the source and statement id, which are
identical in every clone.

Statement coverage = statements executed at least once / all statements, over all PL/pgSQL
functions in `api` and `billing` (statement blocks count as statements, as in plpgsql_check's own
`plpgsql_coverage_statements`). A statement that raised counts as executed. LANGUAGE sql functions
are not measured (the profiler only sees PL/pgSQL); they are counted and listed as such.

Environment:
  PLPGSQL_COVERAGE_JSON    write the merged result there as JSON (optional)
  PLPGSQL_COVERAGE_TARGET  the target printed next to the number (default 95); never enforced here
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import sql
from pytest_postgresql.janitor import DatabaseJanitor

SCHEMAS = ("api", "billing")

# Every PL/pgSQL function of the measured schemas, each statement with its execution count.
STATEMENTS_SQL = """
SELECT p.oid::regprocedure::text AS fn,
       pg_catalog.md5(p.prosrc) AS src,
       s.stmtid, s.parent_stmtid, s.lineno, s.stmtname, s.exec_stmts
  FROM pg_catalog.pg_proc AS p
  JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language AS l ON l.oid = p.prolang
  CROSS JOIN LATERAL {ext}.plpgsql_profiler_function_statements_tb(p.oid) AS s
 WHERE n.nspname = ANY (%(schemas)s) AND l.lanname = 'plpgsql'
 ORDER BY 1, 3
"""

UNMEASURED_SQL = """
SELECT p.oid::regprocedure::text AS fn, l.lanname
  FROM pg_catalog.pg_proc AS p
  JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language AS l ON l.oid = p.prolang
 WHERE n.nspname = ANY (%(schemas)s) AND l.lanname <> 'plpgsql' AND p.prokind IN ('f', 'p')
 ORDER BY 1
"""

RESET_SQL = """
SELECT {ext}.plpgsql_profiler_reset(p.oid)
  FROM pg_catalog.pg_proc AS p
  JOIN pg_catalog.pg_namespace AS n ON n.oid = p.pronamespace
  JOIN pg_catalog.pg_language AS l ON l.oid = p.prolang
 WHERE n.nspname = ANY (%(schemas)s) AND l.lanname = 'plpgsql'
"""


@dataclass
class FunctionProfile:
    """One version (source hash) of one function: its statements and which of them ran."""

    statements: dict[int, tuple[int, str]] = field(default_factory=dict)  # stmtid -> (line, name)
    executed: Counter = field(default_factory=Counter)  # stmtid -> executions over all databases


@dataclass
class Coverage:
    """The session-wide union of every harvested database."""

    profiles: dict[tuple[str, str], FunctionProfile] = field(default_factory=dict)
    canonical: dict[str, str] | None = None  # fn -> source hash, from the template
    unmeasured: dict[str, str] = field(default_factory=dict)  # fn -> language, any database
    template_unmeasured: dict[str, str] | None = None  # the same, in the template only
    databases: int = 0
    errors: list[str] = field(default_factory=list)
    unavailable: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


STATE = Coverage()


def _connect(janitor: DatabaseJanitor) -> psycopg.Connection:
    return psycopg.connect(
        dbname=janitor.dbname,
        user=janitor.user,
        password=janitor.password,
        host=janitor.host,
        port=janitor.port,
        autocommit=True,
        connect_timeout=10,
    )


def _extension_schema(conn: psycopg.Connection) -> str:
    """Create plpgsql_check in this (doomed) database if needed; return its schema, quoted."""
    row = conn.execute(
        "SELECT n.nspname FROM pg_catalog.pg_extension AS e"
        " JOIN pg_catalog.pg_namespace AS n ON n.oid = e.extnamespace"
        " WHERE e.extname = 'plpgsql_check'"
    ).fetchone()
    if row is None:
        conn.execute("CREATE SCHEMA IF NOT EXISTS plpgsql_coverage")
        conn.execute("CREATE EXTENSION plpgsql_check SCHEMA plpgsql_coverage")
        return "plpgsql_coverage"
    return sql.Identifier(row[0]).as_string(conn)


def _profiler_unavailable(conn: psycopg.Connection) -> str | None:
    """Why this server cannot give coverage, or None when it can."""
    preload = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()[0]
    if "plpgsql_check" not in preload:
        return "the server does not preload plpgsql_check (shared_preload_libraries)"
    enabled = conn.execute("SELECT current_setting('plpgsql_check.profiler', true)").fetchone()[0]
    if enabled != "on":
        return f"plpgsql_check.profiler is {enabled!r}, not 'on'"
    available = conn.execute(
        "SELECT 1 FROM pg_catalog.pg_available_extensions WHERE name = 'plpgsql_check'"
    ).fetchone()
    if available is None:
        return "the plpgsql_check extension is not installed on the server"
    return None


def harvest(janitor: DatabaseJanitor) -> None:
    """Add one database's profiles to the session's union, then free them on the server."""
    if STATE.unavailable:
        return
    try:
        with _connect(janitor) as conn:
            reason = _profiler_unavailable(conn)
            if reason:
                STATE.unavailable = reason
                return
            ext = _extension_schema(conn)
            params = {"schemas": list(SCHEMAS)}
            rows = conn.execute(STATEMENTS_SQL.format(ext=ext), params).fetchall()
            unmeasured = conn.execute(UNMEASURED_SQL, params).fetchall()
            conn.execute(RESET_SQL.format(ext=ext), params)
    except psycopg.Error as exc:  # never fail a test for the sake of a coverage number
        if "does not exist" in str(exc):
            return  # the test dropped its database itself: nothing left to read
        with STATE.lock:
            STATE.errors.append(f"{janitor.dbname}: {exc.__class__.__name__}: {exc}".strip())
        return
    with STATE.lock:
        STATE.databases += 1
        seen: dict[str, str] = {}
        for fn, src, stmtid, _parent, lineno, name, executed in rows:
            seen[fn] = src
            profile = STATE.profiles.setdefault((fn, src), FunctionProfile())
            profile.statements[stmtid] = (lineno, name)
            if executed:
                profile.executed[stmtid] += executed
        if janitor.is_template():
            STATE.canonical = seen
            STATE.template_unmeasured = dict(unmeasured)
        STATE.unmeasured.update(dict(unmeasured))


_original_drop = DatabaseJanitor.drop


def _drop_after_harvest(self: DatabaseJanitor) -> None:
    harvest(self)
    _original_drop(self)


def pytest_configure(config: pytest.Config) -> None:
    DatabaseJanitor.drop = _drop_after_harvest


def pytest_unconfigure(config: pytest.Config) -> None:
    DatabaseJanitor.drop = _original_drop


def _functions() -> dict[str, FunctionProfile]:
    """One profile per function: the template's version, or the version most databases had."""
    by_fn: dict[str, list[tuple[str, FunctionProfile]]] = {}
    for (fn, src), profile in STATE.profiles.items():
        by_fn.setdefault(fn, []).append((src, profile))
    result: dict[str, FunctionProfile] = {}
    for fn, versions in by_fn.items():
        if STATE.canonical is not None:
            if fn not in STATE.canonical:
                continue  # created by a test, not part of the schema
            wanted = STATE.canonical[fn]
            match = [p for src, p in versions if src == wanted]
            if match:
                result[fn] = match[0]
                continue
        result[fn] = max(versions, key=lambda v: len(v[1].statements))[1]
    return result


def report() -> dict:
    """The merged coverage as plain data."""
    functions = []
    total = covered = 0
    for fn, profile in sorted(_functions().items()):
        n = len(profile.statements)
        hit = sum(1 for stmtid in profile.statements if profile.executed.get(stmtid))
        missed = [
            f"{line}:{name}"
            for stmtid, (line, name) in sorted(profile.statements.items())
            if not profile.executed.get(stmtid)
        ]
        functions.append({"function": fn, "statements": n, "executed": hit, "missed_lines": missed})
        total += n
        covered += hit
    return {
        "databases": STATE.databases,
        "statements": total,
        "executed": covered,
        "percent": (100.0 * covered / total) if total else None,
        "target": float(os.environ.get("PLPGSQL_COVERAGE_TARGET", "95")),
        "functions": functions,
        "unmeasured_functions": dict(
            sorted(
                (STATE.unmeasured if STATE.template_unmeasured is None else STATE.template_unmeasured).items()
            )
        ),
        "errors": STATE.errors,
        "unavailable": STATE.unavailable,
    }


def short(signature: str, limit: int = 60) -> str:
    """A signature cut to fit the table (the JSON report keeps it whole)."""
    return signature if len(signature) <= limit else signature[: limit - 4] + "...)"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    data = report()
    tr = terminalreporter
    tr.section("PL/pgSQL statement coverage (plpgsql_check profiler)")
    target = data["target"]
    if data["percent"] is None:
        why = data["unavailable"] or (
            "no test database was harvested" if not data["databases"] else "no PL/pgSQL functions"
        )
        tr.write_line(f"PL/pgSQL statement coverage: unavailable ({why}) (target {target:g}%)")
    else:
        width = min(60, max(len(short(f["function"])) for f in data["functions"]))
        tr.write_line(f"{'function':<{width}}  stmts  exec   cover  missed (line:statement)")
        for f in data["functions"]:
            pct = 100.0 * f["executed"] / f["statements"] if f["statements"] else 100.0
            missed = ", ".join(f["missed_lines"][:8])
            if len(f["missed_lines"]) > 8:
                missed += f", ... (+{len(f['missed_lines']) - 8})"
            tr.write_line(
                f"{short(f['function']):<{width}}  {f['statements']:>5}  {f['executed']:>4}  "
                f"{pct:5.1f}%  {missed}"
            )
        if data["unmeasured_functions"]:
            tr.write_line(
                f"not measured (not PL/pgSQL): {len(data['unmeasured_functions'])} functions: "
                + ", ".join(data["unmeasured_functions"])
            )
        tr.write_line(
            f"harvested {data['databases']} test databases; "
            f"{data['executed']} of {data['statements']} statements executed"
        )
        tr.write_line(
            f"PL/pgSQL statement coverage: {data['percent']:.1f}% (target {target:g}%)",
            bold=True,
        )
    for err in data["errors"][:5]:
        tr.write_line(f"coverage harvest error: {err}")
    if len(data["errors"]) > 5:
        tr.write_line(f"... and {len(data['errors']) - 5} more harvest errors")
    out = os.environ.get("PLPGSQL_COVERAGE_JSON")
    if out:
        with open(out, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
