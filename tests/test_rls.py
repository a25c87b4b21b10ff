"""Who sees and does what, by actor: owner, member, another org's user, anonymous, service role.

Every actor is switched exactly as PostgREST does per request: inside a transaction,
set_config('role', ...) and set_config('request.jwt.claims', ..., true) (tests.db_helpers.as_user).
"""

import psycopg
import pytest

from tests.db_helpers import as_user, new_org, one, open_wallet, snapshot, wallet

CLIENT_FUNCTIONS = {"wallet_summary", "list_transactions", "configure_auto_recharge", "begin_checkout"}
READABLE_BY_MEMBERS = {"wallets", "ledger_entries"}

# One call of every money-moving or service function, with arguments that would succeed.
SERVICE_CALLS = [
    ("open_wallet", "SELECT * FROM api.open_wallet(%(new)s)"),
    ("add_wallet_credits", "SELECT * FROM api.add_wallet_credits(%(org)s, 100::bigint, 'k-rls')"),
    ("authorize_call", "SELECT * FROM api.authorize_call(%(org)s, 'call-rls', 1)"),
    ("deduct_call_credits", "SELECT * FROM api.deduct_call_credits(%(org)s, 'call-rls', 60)"),
    ("release_call", "SELECT * FROM api.release_call(%(org)s, 'call-a')"),
    ("register_sms", "SELECT * FROM api.register_sms(%(org)s, 'SM-rls', 1)"),
    ("set_pricing", "SELECT * FROM api.set_pricing(%(org)s, 1::bigint)"),
    ("set_low_balance_threshold", "SELECT * FROM api.set_low_balance_threshold(%(org)s, 5::bigint)"),
    ("set_payment_method", "SELECT * FROM api.set_payment_method(%(org)s, 'cus_1', 'pm_1')"),
    ("expire_holds", "SELECT api.expire_holds()"),
    ("ingest_webhook", "SELECT api.ingest_webhook('stripe', 'evt_rls', 'ping', '{}')"),
    ("ledger_invariant_violations", "SELECT * FROM api.ledger_invariant_violations()"),
]


@pytest.fixture
def orgs(service):
    """Two orgs with money and a call in flight: (org A, org B)."""
    org_a = open_wallet(service, balance_minor=5000)
    org_b = open_wallet(service, balance_minor=7000)
    for org, tag in ((org_a, "a"), (org_b, "b")):
        one(service, "SELECT * FROM api.add_wallet_credits(%s, 300::bigint, 'promo')", (org,))
        one(service, "SELECT * FROM api.authorize_call(%s, %s, 1)", (org, f"call-{tag}"))
        one(service, "SELECT * FROM api.deduct_call_credits(%s, %s, 30)", (org, f"call-{tag}-old"))
    return org_a, org_b


def api_functions(db) -> list[dict]:
    """Every function in schema api, with its oid and name."""
    return db.execute(
        "SELECT p.oid, p.proname, p.oid::regprocedure::text AS signature FROM pg_proc AS p"
        " JOIN pg_namespace AS n ON n.oid = p.pronamespace WHERE n.nspname = 'api'"
        " ORDER BY p.proname"
    ).fetchall()


def billing_relations(db) -> list[str]:
    """Every table and view in schema billing."""
    rows = db.execute(
        "SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'billing' AND c.relkind IN ('r', 'p', 'v', 'm') ORDER BY 1"
    ).fetchall()
    return [row["relname"] for row in rows]


# ---------------------------------------------------------------------------- RLS on every table


def test_every_billing_table_has_row_level_security_enabled_and_forced(db):
    """RLS is enabled and forced (the owner too is subject to it) on every billing table."""
    rows = db.execute(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class AS c"
        " JOIN pg_namespace AS n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'billing' AND c.relkind IN ('r', 'p')"
    ).fetchall()
    names = {row["relname"] for row in rows}
    assert {"wallets", "ledger_entries", "holds", "webhook_events", "settings"} <= names
    unprotected = [r["relname"] for r in rows if not (r["relrowsecurity"] and r["relforcerowsecurity"])]
    assert unprotected == []


# ---------------------------------------------------------------------------- members read their org


@pytest.mark.parametrize("org_role", ["owner", "admin", "member"])
def test_member_sees_only_their_orgs_wallet_and_ledger(db, orgs, org_role):
    """A user of org A, whatever their role, reads org A's rows and nothing of org B."""
    org_a, org_b = orgs
    with as_user(db, org_a, org_role):
        wallets = db.execute("SELECT org_id, balance_minor FROM billing.wallets").fetchall()
        entries = db.execute("SELECT org_id FROM billing.ledger_entries").fetchall()
        of_b = db.execute(
            "SELECT count(*) AS n FROM billing.ledger_entries WHERE org_id = %s", (org_b,)
        ).fetchone()["n"]
    assert wallets == [{"org_id": org_a, "balance_minor": wallet(db, org_a)["balance_minor"]}]
    assert len(entries) == 3 and {e["org_id"] for e in entries} == {org_a}
    assert of_b == 0


def test_another_orgs_user_sees_only_their_own_org(db, orgs):
    """The stranger (a user of org B) sees B's rows and none of A's."""
    org_a, org_b = orgs
    with as_user(db, org_b, "owner"):
        wallets = db.execute("SELECT org_id FROM billing.wallets").fetchall()
        entries = db.execute("SELECT org_id FROM billing.ledger_entries").fetchall()
        summary = one(db, "SELECT * FROM api.wallet_summary()")
    assert wallets == [{"org_id": org_b}]
    assert {e["org_id"] for e in entries} == {org_b}
    assert summary["org_id"] == org_b


def test_user_without_an_org_sees_nothing(db, orgs):
    """A signed-in user whose JWT names no org reads no rows at all."""
    with as_user(db, None):
        assert db.execute("SELECT * FROM billing.wallets").fetchall() == []
        assert db.execute("SELECT * FROM billing.ledger_entries").fetchall() == []
        assert one(db, "SELECT * FROM api.wallet_summary()")["org_id"] is None


def test_no_other_billing_table_is_readable_by_users(db, orgs):
    """Every billing table or view except wallets and ledger_entries refuses a signed-in user
    (42501)."""
    others = [t for t in billing_relations(db) if t not in READABLE_BY_MEMBERS]
    assert {"holds", "settings", "notifications", "webhook_events"} <= set(others)
    readable = []
    for table in others:
        try:
            with as_user(db, orgs[0], "owner"):
                db.execute(f"SELECT * FROM billing.{table}")
            readable.append(table)
        except psycopg.errors.InsufficientPrivilege as exc:
            assert exc.sqlstate == "42501"
    assert readable == []


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE billing.wallets SET balance_minor = balance_minor + 1000000",
        "INSERT INTO billing.ledger_entries (org_id, amount_minor, balance_after_minor, currency,"
        " kind, idempotency_key, fingerprint, source) VALUES (%(org)s, 1, 1, 'usd', 'promo',"
        " 'x', 'x', 'manual')",
        "DELETE FROM billing.holds",
        "UPDATE billing.settings SET max_top_up_minor = 1",
    ],
)
def test_users_cannot_write_billing_tables(db, orgs, statement):
    """Signed-in users write nothing directly: 42501, and nothing changed."""
    before = snapshot(db)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as exc,
        as_user(db, orgs[0], "owner", commit=True),
    ):
        db.execute(statement, {"org": orgs[0]})
    assert exc.value.sqlstate == "42501"
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- users never move money


def test_authenticated_may_execute_only_the_client_functions(db):
    """Of all api functions, authenticated holds EXECUTE on the client functions only."""
    allowed = {
        f["proname"]
        for f in api_functions(db)
        if one(db, "SELECT has_function_privilege('authenticated', %s, 'EXECUTE') AS ok", (f["oid"],))["ok"]
    }
    assert allowed == CLIENT_FUNCTIONS


@pytest.mark.parametrize(("name", "sql"), SERVICE_CALLS, ids=[name for name, _ in SERVICE_CALLS])
def test_authenticated_cannot_execute_money_functions(db, orgs, name, sql):
    """An owner calling a service function directly is refused with 42501; nothing changes."""
    before = snapshot(db)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as exc,
        as_user(db, orgs[0], "owner", commit=True),
    ):
        db.execute(sql, {"org": orgs[0], "new": new_org()})
    assert exc.value.sqlstate == "42501"
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- anonymous


def test_anon_can_execute_no_api_function(db):
    """anon holds EXECUTE on no function in api (nor does PUBLIC, which anon inherits)."""
    functions = api_functions(db)
    assert len(functions) >= len(SERVICE_CALLS) + len(CLIENT_FUNCTIONS)
    executable = [
        f["signature"]
        for f in functions
        if one(db, "SELECT has_function_privilege('anon', %s, 'EXECUTE') AS ok", (f["oid"],))["ok"]
    ]
    assert executable == []
    assert not one(db, "SELECT has_schema_privilege('anon', 'api', 'USAGE') AS ok")["ok"]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM api.wallet_summary()",
        "SELECT * FROM api.list_transactions()",
        "SELECT * FROM api.add_wallet_credits(%(org)s, 100::bigint, 'anon')",
        "SELECT * FROM billing.wallets",
        "SELECT * FROM billing.ledger_entries",
    ],
)
def test_anonymous_caller_is_refused_everything(db, orgs, sql):
    """The anon role (no JWT) can neither call an api function nor read a billing table."""
    before = snapshot(db)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as exc,
        as_user(db, None, role="anon", commit=True),
    ):
        db.execute(sql, {"org": orgs[0]})
    assert exc.value.sqlstate == "42501"
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- service role


def test_service_role_may_execute_every_service_function(db):
    """service_role holds EXECUTE on every api function except the client ones."""
    refused = [
        f["signature"]
        for f in api_functions(db)
        if f["proname"] not in CLIENT_FUNCTIONS
        and not one(db, "SELECT has_function_privilege('service_role', %s, 'EXECUTE') AS ok", (f["oid"],))[
            "ok"
        ]
    ]
    assert refused == []


@pytest.mark.parametrize(("name", "sql"), SERVICE_CALLS, ids=[name for name, _ in SERVICE_CALLS])
def test_service_role_executes_money_functions(db, orgs, name, sql):
    """The same calls authenticated is refused succeed for service_role."""
    with as_user(db, None, role="service_role"):
        db.execute(sql, {"org": orgs[0], "new": new_org()}).fetchall()
        assert one(db, "SELECT current_user AS u")["u"] == "service_role"


def test_service_role_moves_money_through_functions_only(db, orgs):
    """service_role credits through api, but reads no billing table directly (42501)."""
    org_a, _ = orgs
    with as_user(db, None, role="service_role", commit=True):
        r = one(db, "SELECT * FROM api.add_wallet_credits(%s, 100::bigint, 'svc')", (org_a,))
    assert r["status"] == "applied"
    with pytest.raises(psycopg.errors.InsufficientPrivilege), as_user(db, None, role="service_role"):
        db.execute("SELECT * FROM billing.wallets")


# ---------------------------------------------------------------------------- client functions


def test_wallet_summary_is_the_callers_wallet(db, orgs):
    """wallet_summary() returns the caller's wallet with the contract's fields."""
    org_a, _ = orgs
    w = wallet(db, org_a)
    with as_user(db, org_a, "member"):
        s = one(db, "SELECT * FROM api.wallet_summary()")
    assert s["org_id"] == org_a
    assert (s["balance_minor"], s["held_minor"], s["available_minor"]) == (
        w["balance_minor"],
        w["held_minor"],
        w["balance_minor"] - w["held_minor"],
    )
    assert (s["currency"], s["status"], s["debt_limit_minor"]) == ("usd", "active", 0)
    assert {
        "auto_recharge_enabled",
        "auto_recharge_threshold_minor",
        "auto_recharge_amount_minor",
    } <= s.keys()


def test_list_transactions_pages_the_callers_ledger_by_id(db, service, orgs):
    """Keyset pages, newest first: no gap, no overlap, no other org's entry."""
    org_a, org_b = orgs
    for i in range(4):
        one(service, "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)", (org_a, 10 + i, f"p{i}"))
        one(service, "SELECT * FROM api.add_wallet_credits(%s, 5::bigint, %s)", (org_b, f"p{i}"))
    expected = [
        row["id"]
        for row in db.execute(
            "SELECT id FROM billing.ledger_entries WHERE org_id = %s ORDER BY id DESC", (org_a,)
        ).fetchall()
    ]
    assert len(expected) == 7
    pages, before_id = [], None
    with as_user(db, org_a, "member"):
        while True:
            page = db.execute("SELECT * FROM api.list_transactions(%s::bigint, 3)", (before_id,)).fetchall()
            if not page:
                break
            pages.append([row["id"] for row in page])
            before_id = page[-1]["id"]
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == expected
    with as_user(db, org_a, "member"):
        newest = one(db, "SELECT * FROM api.list_transactions()")
    assert (newest["id"], newest["amount_minor"], newest["kind"]) == (expected[0], 13, "top_up")


@pytest.mark.parametrize("max_rows", [0, -1, 501, None])
def test_list_transactions_refuses_a_bad_page_size(db, orgs, max_rows):
    """max_rows outside 1..500 raises 22023 on max_rows."""
    with pytest.raises(psycopg.Error) as exc, as_user(db, orgs[0], "member"):
        db.execute("SELECT * FROM api.list_transactions(NULL, %s::integer)", (max_rows,))
    assert exc.value.sqlstate == "22023"
    assert exc.value.diag.column_name == "max_rows"


@pytest.mark.parametrize("org_role", ["owner", "admin"])
def test_owner_or_admin_configures_auto_recharge(db, orgs, org_role):
    """Owners and admins switch auto-recharge on, for their own org only."""
    org_a, org_b = orgs
    b_before = wallet(db, org_b)
    with as_user(db, org_a, org_role, commit=True):
        w = one(db, "SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2500::bigint)")
    assert (w["org_id"], w["auto_recharge_enabled"]) == (org_a, True)
    a = wallet(db, org_a)
    assert (
        a["auto_recharge_enabled"],
        a["auto_recharge_threshold_minor"],
        a["auto_recharge_amount_minor"],
    ) == (True, 1000, 2500)
    assert wallet(db, org_b) == b_before


@pytest.mark.parametrize(("org_role", "org"), [("member", "a"), (None, "a"), ("owner", None)])
def test_members_cannot_configure_auto_recharge(db, orgs, org_role, org):
    """A member, a user without a role, or a JWT without an org is refused with 42501."""
    before = snapshot(db)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as exc,
        as_user(db, orgs[0] if org else None, org_role, commit=True),
    ):
        db.execute("SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2500::bigint)")
    assert exc.value.sqlstate == "42501"
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("enabled", "threshold", "amount", "field"),
    [
        (True, -1, 2500, "threshold_minor"),
        (True, 1_000_001, 2500, "threshold_minor"),
        (True, None, 2500, "threshold_minor"),
        (True, 1000, 499, "amount_minor"),
        (True, 1000, 200_001, "amount_minor"),
        (True, 1000, None, "amount_minor"),
        (None, 1000, 2500, "enabled"),
    ],
)
def test_auto_recharge_settings_outside_the_bounds_are_invalid(db, orgs, enabled, threshold, amount, field):
    """Thresholds and amounts outside the operator's bounds raise 22023 naming the field."""
    before = snapshot(db)
    with pytest.raises(psycopg.Error) as exc, as_user(db, orgs[0], "owner", commit=True):
        db.execute(
            "SELECT * FROM api.configure_auto_recharge(%s, %s::bigint, %s::bigint)",
            (enabled, threshold, amount),
        )
    assert exc.value.sqlstate == "22023"
    assert exc.value.diag.column_name == field
    assert snapshot(db) == before
