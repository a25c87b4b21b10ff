"""Small helpers the tests share: wallets, balances, and acting as a PostgREST caller."""

import contextlib
import json
import uuid

import psycopg


def new_org() -> uuid.UUID:
    """A fresh organisation id."""
    return uuid.uuid4()


def open_wallet(conn, balance_minor: int = 0, debt_limit_minor: int = 0, org_id=None, **pricing):
    """Open a wallet (as the caller's role), optionally priced and funded; return its org id."""
    org_id = org_id or new_org()
    conn.execute("SELECT * FROM api.open_wallet(%s, 'usd', %s::bigint)", (org_id, debt_limit_minor))
    if pricing:
        conn.execute(
            "SELECT * FROM api.set_pricing(%s, %s::bigint, %s::integer, %s::bigint)",
            (
                org_id,
                pricing.get("rate_per_minute_minor", 70),
                pricing.get("billing_increment_seconds", 1),
                pricing.get("sms_segment_minor", 1),
            ),
        )
    if balance_minor:
        conn.execute(
            "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)",
            (org_id, balance_minor, f"seed-{uuid.uuid4()}"),
        )
    return org_id


def route_assistant(conn, org_id) -> str:
    """A fresh Vapi assistant id routed to the org (its calls are the org's to pay)."""
    assistant_id = f"asst-{uuid.uuid4()}"
    conn.execute("SELECT api.set_vapi_route('assistant', %s, %s)", (assistant_id, org_id))
    return assistant_id


def wallet(conn, org_id) -> dict:
    """The wallet's current row, read as the superuser."""
    return conn.execute("SELECT * FROM billing.wallets WHERE org_id = %s", (org_id,)).fetchone()


def ledger_count(conn, org_id=None) -> int:
    """How many ledger entries exist (for one org, or in all)."""
    if org_id is None:
        return conn.execute("SELECT count(*) AS n FROM billing.ledger_entries").fetchone()["n"]
    return conn.execute(
        "SELECT count(*) AS n FROM billing.ledger_entries WHERE org_id = %s", (org_id,)
    ).fetchone()["n"]


def snapshot(conn) -> dict:
    """Everything money-relevant, to assert that a refused operation changed nothing."""
    return {
        table: conn.execute(f"SELECT * FROM billing.{table} ORDER BY 1").fetchall()
        for table in ("wallets", "ledger_entries", "holds", "recharge_claims", "webhook_events")
    }


@contextlib.contextmanager
def as_user(
    conn: psycopg.Connection, org_id, org_role="owner", user_id=None, role="authenticated", commit=False
):
    """Act as a signed-in Supabase user, exactly as PostgREST does per request: inside a
    transaction, set_config('role') and set_config('request.jwt.claims', ..., true). The
    transaction is rolled back unless commit is true."""
    claims = {
        "sub": str(user_id or uuid.uuid4()),
        "role": role,
        "app_metadata": {"org_id": str(org_id) if org_id else None, "org_role": org_role},
    }
    with conn.transaction(force_rollback=not commit):
        conn.execute("SELECT set_config('role', %s, true)", (role,))
        conn.execute("SELECT set_config('request.jwt.claims', %s, true)", (json.dumps(claims),))
        yield conn


# ---------------------------------------------------------------------------- rule-test helpers


def one(conn, sql: str, params=()) -> dict:
    """Run one statement and return its single row (an api.op_result, a wallet row, ...)."""
    return conn.execute(sql, params).fetchone()


def refusal(conn, sql: str, params=()) -> psycopg.Error:
    """Run a statement that must fail; return the error so the test can check its SQLSTATE."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as exc:
        return exc
    raise AssertionError(f"expected an error from: {sql}")


def hold_row(conn, ref: str, purpose: str = "call") -> dict | None:
    """The hold of a call or SMS, read as the superuser (None when there is none)."""
    return conn.execute(
        "SELECT * FROM billing.holds WHERE purpose = %s AND ref = %s", (purpose, ref)
    ).fetchone()


def notifications(conn, org_id, kind: str) -> list[dict]:
    """The notifications of one kind recorded for an org, oldest first."""
    return conn.execute(
        "SELECT * FROM billing.notifications WHERE org_id = %s AND kind = %s ORDER BY id",
        (org_id, kind),
    ).fetchall()


def snapshot_without_holds(conn) -> dict:
    """snapshot() minus billing.holds: a refused authorisation stores its refusal as a hold row
    (so that its retry stays refused) and must change nothing else."""
    snap = snapshot(conn)
    del snap["holds"]
    return snap
