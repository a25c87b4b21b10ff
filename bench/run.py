"""`make bench`: pgbench rows for the money functions, each a ratio to a baseline of the same run.

    python -m bench.run          (or: make bench)

Server: DATABASE_URL when set (two databases are created on it for the run and dropped after),
else a dedicated embedded PostgreSQL (pgserver) in a temporary folder, with max_connections
raised for the 100-client rows, stopped and deleted afterwards: the bench never touches the
dev database in .pgdata/.

Databases: a ledger database (migrated with shim.migrate, seeded with BENCH_ORGS wallets plus a
hot org and a hold/charge org, all with large balances and debt limits so no charge is refused)
and a pgbench database (pgbench -i -s BENCH_SCALE, plus the one-row table of the bare UPDATE).

Environment (all optional):
    BENCH_SECONDS       seconds per row (default 10)
    BENCH_ROUNDS        run every row this many times, interleaved (default 1); the table then
                        shows median TPS and the median of the per-round ratios (the machine is
                        shared and noisy: e.g. BENCH_ROUNDS=3 BENCH_SECONDS=5)
    BENCH_CLIENTS       clients of the 8-client rows (default 8), pgbench threads BENCH_THREADS (2)
    BENCH_HOLD_CLIENTS  clients of the hold/charge rows (default 100; capped by the server)
    BENCH_SCALE         pgbench scale of the tpcb-like baseline (default 10: >= clients, so
                        pgbench's branch rows are not themselves a hot row)
    BENCH_ORGS          wallets of the many-org rows (default 1000)
    BENCH_ONLY          comma-separated words: run only the rows whose key contains one (plus
                        their baselines); keys: tpcb, deduct-many, webhook, bare, deduct-hot,
                        bare-100, hold-charge, http-bare, http-webhooks, http-admissions,
                        stripe-page, stripe-reconcile
    BENCH_PROFILE=1     track_functions=all; after each row, print the PL/pgSQL functions by
                        self time per transaction (this slows every row down: ratios are off)
    BENCH_STRICT=1      exit 1 when a target is missed
    PGBENCH             the pgbench binary (default: pgserver's PostgreSQL 16 one, else PATH)

Every row starts from a CHECKPOINT (when allowed), so no row pays for the previous one's writes.

Output: the markdown table on stdout and in bench/out/latest.md; pgbench's -l logs in
bench/out/logs/.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from bench.harness import (
    BENCH_DIR,
    ORG_BASE,
    ORG_PREFIX,
    OUT_DIR,
    BenchError,
    Context,
    Measurement,
    Result,
    Row,
    org_suffix,
    render_table,
    round_ratios,
    target_met,
    with_database,
)

# Per process, so that two benches on one DATABASE_URL server never drop each other's databases.
LEDGER_DB = f"creditledger_bench_{os.getpid()}"
TPCB_DB = f"creditledger_bench_tpcb_{os.getpid()}"
BALANCE_MINOR = 10**14  # far more than any run can charge
DEBT_LIMIT_MINOR = 10**14

# --------------------------------------------------------------------------- the rows


def tpcb_like(ctx: Context) -> Measurement:
    """pgbench's built-in TPC-B (sort of): a transfer touching 3 rows + a history insert."""
    return ctx.pgbench_run("tpcb-like", ctx.tpcb_url, builtin="tpcb-like")


def bare_update(ctx: Context) -> Measurement:
    """One row updated by every client, in autocommit."""
    return ctx.pgbench_run("bare-update", ctx.tpcb_url, script=BENCH_DIR / "bare_update.sql")


def bare_update_hold_clients(ctx: Context) -> Measurement:
    """The bare UPDATE at the hold/charge row's client count (its baseline)."""
    return ctx.pgbench_run(
        "bare-update-many-clients",
        ctx.tpcb_url,
        script=BENCH_DIR / "bare_update.sql",
        clients=ctx.hold_clients,
    )


def deduct_many_orgs(ctx: Context) -> Measurement:
    return ctx.pgbench_run(
        "deduct-many-orgs",
        ctx.ledger_url,
        script=BENCH_DIR / "deduct_many_orgs.sql",
        defines={"orgs": ctx.orgs},
    )


def deduct_hot_org(ctx: Context) -> Measurement:
    return ctx.pgbench_run(
        "deduct-hot-org",
        ctx.ledger_url,
        script=BENCH_DIR / "deduct_hot_org.sql",
        defines={"org": org_suffix(0)},
    )


def hold_charge(ctx: Context) -> Measurement:
    return ctx.pgbench_run(
        "hold-charge",
        ctx.ledger_url,
        script=BENCH_DIR / "hold_charge.sql",
        clients=ctx.hold_clients,
        defines={"org": org_suffix(ctx.orgs + 1)},
    )


def ingest_webhook(ctx: Context) -> Measurement:
    return ctx.pgbench_run(
        "ingest-webhook",
        ctx.ledger_url,
        script=BENCH_DIR / "ingest_webhook.sql",
        defines={"orgs": ctx.orgs},
    )


TPCB = "tpcb-like (pgbench built-in)"
BARE = "bare UPDATE, 1 row"
BARE_MANY = "bare UPDATE, 1 row, 100 clients"

# Run order is table order; each measured row runs right after (or near) its baseline so that
# drift during the run (other load on the machine, growing tables) affects both alike.
ROWS: list[Row] = [
    Row(TPCB, tpcb_like, key="tpcb"),
    Row(
        "deduct_call_credits, 1,000 orgs",
        deduct_many_orgs,
        baseline=TPCB,
        target=1.5,
        key="deduct-many",
    ),
    Row(
        "ingest_webhook, Stripe checkout.session.completed",
        ingest_webhook,
        baseline=TPCB,
        key="webhook",
    ),
    Row(BARE, bare_update, key="bare"),
    Row(
        "deduct_call_credits, 1 hot org",
        deduct_hot_org,
        baseline=BARE,
        target=0.6,
        key="deduct-hot",
    ),
    Row(BARE_MANY, bare_update_hold_clients, key="bare-100"),
    Row(
        "authorize_call + deduct_call_credits, 1 org, 100 clients",
        hold_charge,
        baseline=BARE_MANY,
        unit="calls/s",
        note="one call = 2 transactions (authorize, then charge): 0.5x is one lock per commit",
        key="hold-charge",
    ),
]


def all_rows() -> list[Row]:
    """The pgbench rows, then the HTTP rows (bench/http_rows.py)."""
    from bench import http_rows

    return ROWS + list(http_rows.ROWS)


def select_rows(rows: list[Row], only: str | None) -> list[Row]:
    """Rows whose key contains one of the comma-separated words, plus their baselines."""
    if not only:
        return rows
    wanted = [w.strip().lower() for w in only.split(",") if w.strip()]
    chosen = {r.name for r in rows if any(w in r.key for w in wanted)}
    chosen |= {r.baseline for r in rows if r.name in chosen and r.baseline}
    return [r for r in rows if r.name in chosen]


# --------------------------------------------------------------------------- the server


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def pgbench_path() -> Path:
    """pgbench: $PGBENCH, else pgserver's (PostgreSQL 16), else the one on PATH."""
    if os.environ.get("PGBENCH"):
        return Path(os.environ["PGBENCH"])
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidate = POSTGRES_BIN_PATH / "pgbench"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    found = shutil.which("pgbench")
    if not found:
        raise SystemExit("pgbench not found: install pgserver (make install) or set PGBENCH")
    return Path(found)


@contextmanager
def embedded_server(max_connections: int) -> Iterator[str]:
    """A dedicated pgserver cluster in a temporary folder; stopped and deleted on exit."""
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
    import pgserver

    data_dir = tempfile.mkdtemp(prefix="creditledger-bench-")
    server = pgserver.get_server(data_dir, cleanup_mode="stop")
    try:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET max_connections = {int(max_connections)}")
            if os.environ.get("BENCH_PROFILE") == "1":
                conn.execute("ALTER SYSTEM SET track_functions = 'all'")
        server.cleanup()  # max_connections needs a restart: stop, then start again
        server = pgserver.get_server(data_dir, cleanup_mode="stop")
        yield server.get_uri()
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


@contextmanager
def bench_databases(server_url: str, names: list[str]) -> Iterator[None]:
    """Fresh databases for the run, dropped afterwards (also on a server we did not start)."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        for name in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def connection_budget(server_url: str, wanted: int) -> int:
    """How many more clients the server accepts now (minus a margin), at most `wanted`."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT current_setting('max_connections')::int"
            " - current_setting('superuser_reserved_connections')::int"
            " - (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')"
        ).fetchone()
    return max(1, min(wanted, row[0] - 5))


# --------------------------------------------------------------------------- preparing


def seed_ledger(url: str, orgs: int) -> None:
    """Wallets for orgs 0 (hot) .. orgs + 1 (hold/charge), each funded, with a big debt limit,
    and some history in every table the rows touch: one held-then-charged call and one Stripe
    Checkout webhook per org.

    The history matters: after VACUUM ANALYZE an empty table has reltuples = 0, the planner then
    prices a seq scan of it at 0, and a session's cached generic plan keeps seq-scanning the
    table as the run fills it (holds, webhook_events), until autoanalyze invalidates the plan.
    """
    from shim.database import connect

    params = {
        "prefix": ORG_PREFIX,
        "base": ORG_BASE,
        "last": orgs + 1,
        "debt": DEBT_LIMIT_MINOR,
        "credit": BALANCE_MINOR,
    }
    orgs_sql = (
        "SELECT n, (%(prefix)s::text || (%(base)s::bigint + n))::uuid AS org_id"
        " FROM generate_series(0, %(last)s::int) AS n"
    )
    seed_steps = [
        "count(api.open_wallet(o.org_id, 'usd', %(debt)s::bigint))",
        "count(api.add_wallet_credits(o.org_id, %(credit)s::bigint, 'bench-seed'))",
        "count(api.authorize_call(o.org_id, 'bench-seed-call-' || o.n))",
        "count(api.deduct_call_credits(o.org_id, 'bench-seed-call-' || o.n, 60))",
        """count(api.ingest_webhook('stripe', 'evt_seed_' || o.n, 'checkout.session.completed',
             jsonb_build_object('id', 'evt_seed_' || o.n, 'object', 'event',
               'type', 'checkout.session.completed',
               'data', jsonb_build_object('object', jsonb_build_object(
                 'id', 'cs_seed_' || o.n, 'object', 'checkout.session', 'payment_status', 'paid',
                 'amount_total', 2000, 'currency', 'usd', 'client_reference_id', o.org_id,
                 'payment_intent', 'pi_seed_' || o.n)))))""",
    ]
    with connect(url) as conn:
        for step in seed_steps:  # one statement per step: each sees the previous one's rows
            conn.execute(f"SELECT {step} FROM ({orgs_sql}) o", params)
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM billing.ledger_entries),"
            " (SELECT count(*) FROM billing.holds WHERE status = 'captured'),"
            " (SELECT count(*) FROM billing.webhook_events WHERE status = 'processed')"
        ).fetchone()
        if counts != (3 * (orgs + 2), orgs + 2, orgs + 2):
            raise SystemExit(f"seeding went wrong: entries, captured holds, events = {counts}")
        conn.commit()
    with connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def prepare_tpcb(ctx: Context, scale: int) -> None:
    """pgbench's tables at `scale`, and the one-row table of the bare UPDATE."""
    proc = subprocess.run(
        [str(ctx.pgbench), "-i", "-q", "-s", str(scale), "-I", "dtGvp", ctx.tpcb_url],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"pgbench -i failed: {proc.stderr.strip()}")
    with psycopg.connect(ctx.tpcb_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE bench_hot_row (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO bench_hot_row VALUES (1, 0)")
        conn.execute("VACUUM ANALYZE bench_hot_row")


def checkpoint(ctx: Context) -> None:
    """Start every row from a clean checkpoint, so no row pays for the previous one's writes."""
    if not ctx.can_checkpoint:
        return
    try:
        with psycopg.connect(ctx.admin_url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        ctx.can_checkpoint = False


# --------------------------------------------------------------------------- profiling


def function_stats(url: str) -> dict[str, tuple[int, float, float]]:
    """pg_stat_user_functions of the ledger database: calls, total ms, self ms per function."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = conn.execute(
            "SELECT schemaname || '.' || funcname, calls, total_time, self_time FROM pg_stat_user_functions"
        ).fetchall()
    return {name: (calls, total, self_) for name, calls, total, self_ in rows}


def profile_report(before: dict, after: dict, transactions: int) -> str:
    """Functions by self time per transaction between two snapshots (BENCH_PROFILE=1)."""
    lines = []
    for name, (calls, total, self_) in after.items():
        c0, t0, s0 = before.get(name, (0, 0.0, 0.0))
        if calls - c0 > 0:
            lines.append((self_ - s0, name, calls - c0, total - t0))
    lines.sort(reverse=True)
    n = max(transactions, 1)
    out = ["    function | calls/tx | self µs/tx | total µs/tx"]
    for self_ms, name, calls, total_ms in lines[:15]:
        out.append(f"    {name} | {calls / n:.2f} | {self_ms * 1000 / n:.1f} | {total_ms * 1000 / n:.1f}")
    return "\n".join(out)


# --------------------------------------------------------------------------- the run


def server_facts(
    ctx: Context, origin: str, rounds: int, load_before: tuple[float, float, float]
) -> list[str]:
    with psycopg.connect(ctx.ledger_url, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name IN"
                " ('shared_buffers', 'synchronous_commit', 'fsync', 'max_connections',"
                " 'wal_level', 'track_functions')"
            ).fetchall()
        )
    pgbench_version = subprocess.run(
        [str(ctx.pgbench), "--version"], capture_output=True, text=True
    ).stdout.strip()
    try:
        rev = subprocess.run(
            ["git", "-C", str(BENCH_DIR), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        rev = "?"
    return [
        f"- server: PostgreSQL {version}, {origin}; {pgbench_version}; git {rev or '?'}",
        f"- machine: {os.cpu_count()} CPUs, {platform.system()} {platform.machine()};"
        f" load average {load_before[0]:.1f} before the rows, {os.getloadavg()[0]:.1f} after"
        " (other work on the machine skews absolute TPS; the ratios less so)",
        f"- {ctx.seconds} s per row, {rounds} round(s) (TPS: median; ratio: median of the"
        f" per-round ratios; latencies: all rounds); {ctx.clients} clients ({ctx.threads}"
        f" pgbench threads) unless the row says otherwise; the 100-client rows ran"
        f" {ctx.hold_clients} clients; simple query protocol; one transaction per call",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in sorted(settings.items())),
        "- every ratio is TPS over its baseline's TPS measured in this run;"
        " p50/p99 from pgbench's per-transaction -l logs",
    ]


def run(server_url: str, origin: str) -> int:
    seconds = env_int("BENCH_SECONDS", 10)
    clients = env_int("BENCH_CLIENTS", 8)
    threads = env_int("BENCH_THREADS", 2)
    scale = env_int("BENCH_SCALE", 10)
    orgs = env_int("BENCH_ORGS", 1000)
    rounds = max(1, env_int("BENCH_ROUNDS", 1))
    profile = os.environ.get("BENCH_PROFILE") == "1"
    load_before = os.getloadavg()
    rows = select_rows(all_rows(), os.environ.get("BENCH_ONLY"))

    log_dir = OUT_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.iterdir():
        old.unlink()

    with bench_databases(server_url, [LEDGER_DB, TPCB_DB]):
        ctx = Context(
            admin_url=server_url,
            ledger_url=with_database(server_url, LEDGER_DB),
            tpcb_url=with_database(server_url, TPCB_DB),
            pgbench=pgbench_path(),
            seconds=seconds,
            clients=clients,
            threads=threads,
            hold_clients=connection_budget(server_url, env_int("BENCH_HOLD_CLIENTS", 100)),
            orgs=orgs,
            log_dir=log_dir,
        )
        started = time.monotonic()
        from shim.migrate import migrate

        migrate(ctx.ledger_url)
        seed_ledger(ctx.ledger_url, orgs)
        prepare_tpcb(ctx, scale)
        print(f"prepared in {time.monotonic() - started:.1f} s", file=sys.stderr)

        results = [Result(row) for row in rows]
        profiles: list[str] = []
        for ctx.round in range(1, rounds + 1):
            for i, result in enumerate(results, 1):
                row = result.row
                checkpoint(ctx)
                before = function_stats(ctx.ledger_url) if profile else {}
                m: Measurement | None = None
                try:
                    m = row.measure(ctx)
                    status = f"{m.tps:,.0f} {row.unit}, {m.transactions} transactions"
                    status += f", {m.failed} failed"
                except (BenchError, subprocess.TimeoutExpired, psycopg.Error) as exc:
                    result.errors.append(str(exc))
                    status = f"ERROR {exc}"
                result.measurements.append(m)
                print(f"[round {ctx.round}, {i}/{len(rows)}] {row.name}: {status}", file=sys.stderr)
                if profile and m is not None:
                    report = profile_report(before, function_stats(ctx.ledger_url), m.transactions)
                    profiles.append(f"- round {ctx.round}, {row.name}\n{report}")
                    print(report, file=sys.stderr)
        facts = server_facts(ctx, origin, rounds, load_before)

    by_name = {r.row.name: r for r in results}
    notes = [f"- {r.row.name}: {r.row.note}" for r in results if r.row.note]
    if rounds > 1:
        notes += [
            f"- {r.row.name}: per-round ratios " + ", ".join(f"{x:.2f}" for x in round_ratios(r, by_name))
            for r in results
            if r.row.baseline
        ]
    notes += [f"- {r.row.name}: {r.failed} failed transactions" for r in results if r.failed]
    notes += [f"- {r.row.name}: ERROR {e}" for r in results for e in r.errors]
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    profile_section = ["", "## Profile (BENCH_PROFILE=1: ratios are not comparable)", *profiles]
    text = "\n".join(
        [f"# make bench, {stamp}", "", render_table(results), "", *facts, *notes]
        + (profile_section if profile else [])
    )
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "latest.md").write_text(text + "\n")
    print(text)

    if any(r.errors for r in results):
        return 1
    missed = [r for r in results if target_met(r, by_name) is False]
    return 1 if missed and os.environ.get("BENCH_STRICT") == "1" else 0


def main() -> int:
    url = os.environ.get("DATABASE_URL")
    if url:
        return run(url, "DATABASE_URL's server")
    hold = env_int("BENCH_HOLD_CLIENTS", 100)
    clients = env_int("BENCH_CLIENTS", 8)
    with embedded_server(max_connections=hold + 2 * clients + 20) as server_url:
        return run(server_url, "dedicated embedded server (pgserver, temporary cluster)")


if __name__ == "__main__":
    sys.exit(main())
