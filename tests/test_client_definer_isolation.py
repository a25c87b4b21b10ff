"""The two client functions that stay SECURITY DEFINER (api.begin_checkout and
api.configure_auto_recharge; README "Why two client functions are SECURITY DEFINER") and the
isolation their bodies guarantee instead of RLS: a user of org A never affects org B, a member
cannot configure auto-recharge, anon can do nothing. Supabase's linter (splinter) flags exactly
these with lint 0029 (authenticated_security_definer_function_executable); its query is repeated
here so that a third one fails the suite instead of slipping in."""

import re
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.db_helpers import as_user, one, open_wallet, snapshot
from tests.test_concurrency import run_together

README = Path(__file__).resolve().parent.parent / "README.md"
DEFINER_CLIENT_FUNCTIONS = {"begin_checkout", "configure_auto_recharge"}

CONFIGURE = "SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2500::bigint, 100000::bigint)"
CHECKOUT = "SELECT api.begin_checkout(%s::bigint, %s) AS a"


def org_rows(db, org) -> dict:
    """Every row of one org in the tables these two functions write or read."""
    return {
        table: db.execute(f"SELECT * FROM billing.{table} WHERE org_id = %s ORDER BY 1", (org,)).fetchall()
        for table in (
            "wallets",
            "ledger_entries",
            "recharge_claims",
            "checkout_requests",
            "checkout_aliases",
            "notifications",
        )
    }


@pytest.fixture
def orgs(service):
    """Org A and org B, both with a saved card; B has auto-recharge on and an open checkout."""
    org_a, org_b = open_wallet(service, balance_minor=5000), open_wallet(service, balance_minor=7000)
    for org in (org_a, org_b):
        service.execute("SELECT * FROM api.set_payment_method(%s, 'cus_iso', %s)", (org, f"pm_{org.hex[:8]}"))
    return org_a, org_b


def lint_0029(db) -> set[str]:
    """splinter's lint 0029 over schema api and billing: SECURITY DEFINER functions that
    authenticated may execute."""
    rows = db.execute(
        "SELECT n.nspname || '.' || p.proname AS name FROM pg_proc AS p"
        " JOIN pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE p.prosecdef AND n.nspname IN ('api', 'billing')"
        "   AND has_function_privilege('authenticated', p.oid, 'EXECUTE')"
    ).fetchall()
    return {r["name"] for r in rows}


def test_exactly_the_two_documented_client_functions_are_security_definer(db):
    """What lint 0029 finds is what the README names as the exceptions, and nothing else."""
    assert lint_0029(db) == {f"api.{name}" for name in DEFINER_CLIENT_FUNCTIONS}
    section = README.read_text().split("### Why two client functions are SECURITY DEFINER", 1)[1]
    section = section.split("\n#", 1)[0]
    named = set(re.findall(r"`api\.(\w+)\(", section))
    assert named == DEFINER_CLIENT_FUNCTIONS


def test_the_definer_functions_take_no_org_parameter(db):
    """The org comes from the JWT's app_metadata only (which only the service role can set):
    no parameter can name another org. (search_path is pinned: tests/test_function_lint.py.)"""
    rows = db.execute(
        "SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args FROM pg_proc AS p"
        " JOIN pg_namespace AS n ON n.oid = p.pronamespace"
        " WHERE n.nspname = 'api' AND p.proname = ANY(%s)",
        (list(DEFINER_CLIENT_FUNCTIONS),),
    ).fetchall()
    assert {r["proname"] for r in rows} == DEFINER_CLIENT_FUNCTIONS
    for r in rows:
        assert "org" not in r["args"], r


@pytest.mark.parametrize("org_role", ["owner", "admin"])
def test_configuring_org_a_changes_nothing_of_org_b(db, orgs, org_role):
    org_a, org_b = orgs
    b_before = org_rows(db, org_b)
    with as_user(db, org_a, org_role, commit=True) as conn:
        w = one(conn, CONFIGURE)
    assert w["org_id"] == org_a and w["auto_recharge_enabled"]
    assert org_rows(db, org_b) == b_before


def test_checkout_of_org_a_never_returns_or_touches_org_b_sessions(db, orgs, service):
    """Org B has an open session for 2500 and a client_request_id; org A's owner asks for the
    same amount with the same client_request_id, within the dedupe window: A gets a request of
    its own, never B's session, and B's rows are unchanged."""
    org_a, org_b = orgs
    request_id = uuid.uuid4()
    with as_user(db, org_b, "member", commit=True) as conn:
        b_answer = one(conn, CHECKOUT, (2500, request_id))["a"]
    service.execute(
        "SELECT api.record_checkout_session(%s, 'cs_test_b', 'https://checkout.stripe.test/b')",
        (b_answer["request_id"],),
    )
    b_before = org_rows(db, org_b)
    with as_user(db, org_a, "owner", commit=True) as conn:
        a_answer = one(conn, CHECKOUT, (2500, request_id))["a"]
    assert (a_answer["status"], a_answer["org_id"], a_answer["session_id"]) == ("create", str(org_a), None)
    assert a_answer["request_id"] != b_answer["request_id"]
    assert org_rows(db, org_b) == b_before


@pytest.mark.parametrize("sql", [CONFIGURE, "SELECT api.begin_checkout(2500::bigint, gen_random_uuid())"])
def test_anon_can_call_neither(db, orgs, sql):
    before = snapshot(db)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as exc,
        as_user(db, orgs[0], role="anon", commit=True),
    ):
        db.execute(sql)
    assert exc.value.sqlstate == "42501"
    assert snapshot(db) == before


@pytest.mark.parametrize("sql", [CONFIGURE, "SELECT api.begin_checkout(2500::bigint, gen_random_uuid())"])
def test_a_jwt_naming_an_org_without_a_wallet_changes_nothing(db, orgs, sql):
    before = snapshot(db)
    with pytest.raises(psycopg.errors.NoDataFound), as_user(db, uuid.uuid4(), "owner", commit=True) as conn:
        conn.execute(sql)
    assert snapshot(db) == before


def test_many_users_of_two_orgs_at_once_stay_in_their_own_org(db_url, db, orgs):
    """16 connections, users of A and B alternately, each configuring its org and asking for a
    checkout with one shared client_request_id: every answer is the caller's org, each org ends
    with one request of its own and its own settings."""
    org_a, org_b = orgs
    shared_request = uuid.uuid4()

    def work(index, conn, barrier):
        org = (org_a, org_b)[index % 2]
        amount = 2500 if org == org_a else 3500
        barrier.wait()
        with as_user(conn, org, "owner", commit=True):
            w = one(
                conn, "SELECT * FROM api.configure_auto_recharge(true, %s::bigint, 2500::bigint)", (amount,)
            )
            answer = one(conn, CHECKOUT, (amount, shared_request))["a"]
        return org, w["org_id"], answer

    results = run_together(db_url, 16, work)
    for org, wallet_org, answer in results:
        assert wallet_org == org and answer["org_id"] == str(org)
    for org, amount in ((org_a, 2500), (org_b, 3500)):
        rows = org_rows(db, org)
        assert [(r["amount_minor"], r["client_request_id"]) for r in rows["checkout_requests"]] == [
            (amount, shared_request)
        ]
        assert rows["wallets"][0]["auto_recharge_threshold_minor"] == amount
