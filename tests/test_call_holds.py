"""Calls: authorisation holds, charging a finished call, releasing and expiring holds."""

from datetime import timedelta

import pytest

from tests.db_helpers import (
    hold_row,
    ledger_count,
    new_org,
    notifications,
    one,
    open_wallet,
    refusal,
    snapshot,
    snapshot_without_holds,
    wallet,
)

AUTHORIZE = "SELECT * FROM api.authorize_call(%s, %s, %s::integer)"
CHARGE = "SELECT * FROM api.deduct_call_credits(%s, %s, %s::integer)"
RELEASE = "SELECT * FROM api.release_call(%s, %s)"
CREDIT = "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)"


def expire_now(db, ref, purpose="call"):
    """Move a hold's expiry into the past, as only the superuser can."""
    db.execute(
        "UPDATE billing.holds SET expires_at = now() - interval '1 second' WHERE purpose = %s AND ref = %s",
        (purpose, ref),
    )


# ---------------------------------------------------------------------------- authorize_call


def test_authorisation_holds_the_expected_cost(service, db):
    """A hold of max_minutes at the org's rate; balance untouched, available reduced."""
    org = open_wallet(service, balance_minor=1000, rate_per_minute_minor=90)
    r = one(service, AUTHORIZE, (org, "call-1", 3))
    assert (r["status"], r["amount_minor"], r["balance_minor"], r["reason"]) == ("applied", 270, 1000, None)
    w = wallet(db, org)
    assert (w["balance_minor"], w["held_minor"]) == (1000, 270)
    assert hold_row(db, "call-1")["status"] == "open"
    assert ledger_count(db, org) == 1  # only the seed credit


def test_authorisation_without_max_minutes_holds_the_default_five_minutes(service, db):
    """max_minutes defaults to the operator's default_call_max_minutes (5)."""
    org = open_wallet(service, balance_minor=1000)
    r = one(service, "SELECT * FROM api.authorize_call(%s, 'call-1')", (org,))
    assert (r["status"], r["amount_minor"]) == ("applied", 5 * 70)
    assert wallet(db, org)["held_minor"] == 350


def test_same_authorisation_twice_is_duplicate(service, db):
    """The same call authorised again answers duplicate and holds nothing more."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 2))
    before = snapshot(db)
    r = one(service, AUTHORIZE, (org, "call-1", 2))
    assert (r["status"], r["amount_minor"], r["reason"]) == ("duplicate", 140, None)
    assert snapshot(db) == before


def test_same_call_with_other_max_minutes_is_conflict(service, db):
    """The same call id asking for a different hold is a conflict and changes nothing."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 2))
    before = snapshot(db)
    r = one(service, AUTHORIZE, (org, "call-1", 3))
    assert (r["status"], r["reason"]) == ("conflict", "different_request")
    assert snapshot(db) == before


def test_same_call_authorised_in_another_org_is_conflict(service, db):
    """A Vapi call id belongs to one org: authorising it in a second org is a conflict."""
    org_a = open_wallet(service, balance_minor=1000)
    org_b = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org_a, "call-1", 2))
    before = snapshot(db)
    r = one(service, AUTHORIZE, (org_b, "call-1", 2))
    assert (r["status"], r["reason"], r["amount_minor"]) == ("conflict", "other_org", None)
    assert snapshot(db) == before


def test_authorisation_beyond_available_funds_is_rejected(service, db):
    """balance - held - hold < -debt_limit is rejected as insufficient_funds; nothing moves
    (the refusal is remembered as a rejected hold of zero effect)."""
    org = open_wallet(service, balance_minor=100)
    before = snapshot_without_holds(db)
    r = one(service, AUTHORIZE, (org, "call-1", 2))  # 140 > 100
    assert (r["status"], r["reason"], r["amount_minor"], r["balance_minor"]) == (
        "rejected",
        "insufficient_funds",
        140,
        100,
    )
    assert snapshot_without_holds(db) == before
    h = hold_row(db, "call-1")
    assert (h["status"], h["reason"]) == ("rejected", "insufficient_funds")
    assert wallet(db, org)["held_minor"] == 0


def test_retry_of_rejected_authorisation_stays_rejected(service, db):
    """After a refusal, credit arrives; the same call id retried is still refused
    (duplicate, insufficient_funds) and changes nothing, while a new call id is accepted."""
    org = open_wallet(service, balance_minor=100)
    one(service, AUTHORIZE, (org, "call-1", 2))
    one(service, CREDIT, (org, 10_000, "refill"))
    before = snapshot(db)
    r = one(service, AUTHORIZE, (org, "call-1", 2))
    assert (r["status"], r["reason"], r["entry_id"]) == ("duplicate", "insufficient_funds", None)
    assert snapshot(db) == before
    assert one(service, AUTHORIZE, (org, "call-2", 2))["status"] == "applied"


def test_holds_may_use_the_debt_limit_but_never_pass_it(service, db):
    """Holds are accepted while balance - held - hold >= -debt_limit, to the minor unit."""
    org = open_wallet(service, balance_minor=100, debt_limit_minor=180)  # room for 280
    assert one(service, AUTHORIZE, (org, "call-1", 2))["status"] == "applied"  # 140
    assert one(service, AUTHORIZE, (org, "call-2", 2))["status"] == "applied"  # 280: exactly
    before = snapshot_without_holds(db)
    r = one(service, AUTHORIZE, (org, "call-3", 1))  # 70 more: past the limit
    assert (r["status"], r["reason"]) == ("rejected", "insufficient_funds")
    assert snapshot_without_holds(db) == before
    w = wallet(db, org)
    assert w["balance_minor"] - w["held_minor"] == -180


def test_authorising_an_already_charged_call_places_no_hold(service, db):
    """A status update that arrives after the call's charge holds nothing."""
    org = open_wallet(service, balance_minor=1000)
    charge = one(service, CHARGE, (org, "call-1", 60))
    before = snapshot(db)
    r = one(service, AUTHORIZE, (org, "call-1", 5))
    assert (r["status"], r["reason"], r["entry_id"]) == ("duplicate", "already_charged", charge["entry_id"])
    assert snapshot(db) == before


def test_authorising_a_call_charged_in_another_org_is_conflict(service, db):
    """A call charged to org A cannot be held in org B."""
    org_a = open_wallet(service, balance_minor=1000)
    org_b = open_wallet(service, balance_minor=1000)
    one(service, CHARGE, (org_a, "call-1", 60))
    before = snapshot(db)
    r = one(service, AUTHORIZE, (org_b, "call-1", 5))
    assert (r["status"], r["reason"]) == ("conflict", "other_org")
    assert snapshot(db) == before


def test_authorisation_for_an_unknown_org_is_rejected(service, db):
    """An org without a wallet is rejected as unknown_org and nothing is written."""
    before = snapshot(db)
    r = one(service, AUTHORIZE, (new_org(), "call-1", 1))
    assert (r["status"], r["reason"]) == ("rejected", "unknown_org")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("org", "call_id", "max_minutes", "field"),
    [
        (None, "call-1", 1, "org_id"),
        ("org", None, 1, "call_id"),
        ("org", "", 1, "call_id"),
        ("org", "c" * 256, 1, "call_id"),
        ("org", "call-1", 0, "max_minutes"),
        ("org", "call-1", -3, "max_minutes"),
        ("org", "call-1", 1441, "max_minutes"),
    ],
)
def test_authorisation_refuses_invalid_input(service, db, org, call_id, max_minutes, field):
    """A null org, a bad call id or max_minutes outside 1..1440 raise 22023 naming the field."""
    real_org = open_wallet(service, balance_minor=10_000)
    before = snapshot(db)
    exc = refusal(service, AUTHORIZE, (real_org if org else None, call_id, max_minutes))
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field)
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- deduct_call_credits


@pytest.mark.parametrize(
    ("duration", "increment", "rate", "cost"),
    [
        (61, 1, 70, 72),  # ceil(61 * 70 / 60)
        (60, 1, 70, 70),
        (1, 1, 70, 2),  # ceil(70 / 60)
        (1, 1, 1, 1),  # ceil(1 / 60): a started unit is owed
        (1, 60, 70, 70),  # rounded up to a whole minute
        (60, 60, 70, 70),
        (61, 60, 70, 140),
        (13, 6, 7, 3),  # 18 s -> ceil(18 * 7 / 60) = ceil(2.1)
        (29, 30, 100, 50),
        (31, 30, 100, 100),
        (3600, 1, 70, 4200),
        (3599, 3600, 9, 540),  # an hour increment: 60 min x 9
        (604800, 1, 100_000_000, 1_008_000_000_000),  # a week at the highest rate
        (45, 1, 0, 0),  # free calls are still recorded
    ],
)
def test_call_is_priced_by_rounded_duration_and_rate(service, db, duration, increment, rate, cost):
    """Duration rounded up to the billing increment, then ceil(seconds x rate / 60)."""
    org = open_wallet(
        service,
        balance_minor=10**13,
        rate_per_minute_minor=rate,
        billing_increment_seconds=increment,
    )
    r = one(service, CHARGE, (org, "call-1", duration))
    assert (r["status"], r["amount_minor"], r["balance_minor"]) == ("applied", -cost, 10**13 - cost)
    entry = one(db, "SELECT * FROM billing.ledger_entries WHERE id = %s", (r["entry_id"],))
    assert (entry["kind"], entry["provider_ref"], entry["source"]) == (
        "call_charge",
        "vapi:call:call-1",
        "vapi",
    )
    assert entry["details"]["duration_seconds"] == duration


def test_charge_captures_the_hold_and_records_the_true_cost(service, db):
    """A finished call is charged its real cost (not the hold) and its hold is freed."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 5))  # holds 350
    r = one(service, CHARGE, (org, "call-1", 125))  # ceil(125 * 70 / 60) = 146
    assert (r["status"], r["amount_minor"], r["balance_minor"], r["reason"]) == ("applied", -146, 854, None)
    w = wallet(db, org)
    assert (w["balance_minor"], w["held_minor"]) == (854, 0)
    assert hold_row(db, "call-1")["status"] == "captured"


def test_charge_longer_than_its_hold_is_recorded_in_full(service, db):
    """A call that ran past its authorised minutes is still owed every second."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 1))  # holds 70
    r = one(service, CHARGE, (org, "call-1", 600))
    assert (r["status"], r["amount_minor"]) == ("applied", -700)
    assert wallet(db, org)["held_minor"] == 0


def test_zero_second_call_is_a_zero_entry_that_frees_its_hold(service, db):
    """A call that never connected charges 0 (an entry, so it stays idempotent) and frees
    its hold; its retry is a duplicate."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 5))
    r = one(service, CHARGE, (org, "call-1", 0))
    assert (r["status"], r["amount_minor"], r["balance_minor"]) == ("applied", 0, 1000)
    assert r["entry_id"] is not None
    assert wallet(db, org)["held_minor"] == 0
    assert hold_row(db, "call-1")["status"] == "captured"
    before = snapshot(db)
    again = one(service, CHARGE, (org, "call-1", 0))
    assert (again["status"], again["entry_id"]) == ("duplicate", r["entry_id"])
    assert snapshot(db) == before


def test_same_charge_twice_is_duplicate_with_the_original_entry(service, db):
    """A redelivered end-of-call report answers duplicate with the first entry."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 5))
    first = one(service, CHARGE, (org, "call-1", 61))
    before = snapshot(db)
    again = one(
        service,
        "SELECT * FROM api.deduct_call_credits(%s, 'call-1', 61, '{\"redelivered\": true}')",
        (org,),
    )
    assert (again["status"], again["entry_id"], again["amount_minor"], again["balance_minor"]) == (
        "duplicate",
        first["entry_id"],
        -72,
        928,
    )
    assert snapshot(db) == before


def test_same_call_with_another_duration_is_conflict_kept_as_discrepancy(service, db):
    """A second report with another duration changes no money and records a
    duration_mismatch for reconciliation."""
    org = open_wallet(service, balance_minor=1000)
    first = one(service, CHARGE, (org, "call-1", 61))
    before = snapshot(db)
    r = one(service, CHARGE, (org, "call-1", 95))
    assert (r["status"], r["reason"], r["balance_minor"]) == ("conflict", "different_request", 928)
    assert snapshot(db) == before
    rows = db.execute("SELECT * FROM billing.discrepancies WHERE kind = 'duration_mismatch'").fetchall()
    assert len(rows) == 1
    d = rows[0]
    assert (d["provider"], d["ref"], d["org_id"], d["status"]) == ("vapi", "call-1", org, "open")
    assert d["evidence"]["charged_entry_id"] == first["entry_id"]
    assert d["evidence"]["reported_duration_seconds"] == 95


def test_same_call_charged_in_another_org_is_conflict(service, db):
    """One Vapi call id can never be charged to two orgs."""
    org_a = open_wallet(service, balance_minor=1000)
    org_b = open_wallet(service, balance_minor=1000)
    one(service, CHARGE, (org_a, "call-1", 61))
    before = snapshot(db)
    r = one(service, CHARGE, (org_b, "call-1", 61))
    assert (r["status"], r["reason"], r["entry_id"], r["balance_minor"]) == (
        "conflict",
        "other_org",
        None,
        1000,
    )
    assert snapshot(db) == before
    assert db.execute("SELECT count(*) AS n FROM billing.discrepancies").fetchone()["n"] == 0


def test_charging_a_call_held_by_another_org_is_conflict(service, db):
    """A call authorised in org A cannot be charged to org B."""
    org_a = open_wallet(service, balance_minor=1000)
    org_b = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org_a, "call-1", 2))
    before = snapshot(db)
    r = one(service, CHARGE, (org_b, "call-1", 61))
    assert (r["status"], r["reason"]) == ("conflict", "other_org")
    assert snapshot(db) == before


def test_charge_is_recorded_whatever_the_balance(service, db):
    """A finished call is owed even on an empty wallet: the charge is applied."""
    org = open_wallet(service, debt_limit_minor=1000)
    r = one(service, CHARGE, (org, "call-1", 120))
    assert (r["status"], r["amount_minor"], r["balance_minor"], r["reason"]) == ("applied", -140, -140, None)
    assert wallet(db, org)["status"] == "active"


def test_charge_ending_exactly_at_the_debt_limit_does_not_suspend(service, db):
    """balance = -debt_limit is allowed; only below it suspends."""
    org = open_wallet(service, debt_limit_minor=140)
    r = one(service, CHARGE, (org, "call-1", 120))
    assert (r["balance_minor"], r["reason"]) == (-140, None)
    assert wallet(db, org)["status"] == "active"


def test_charge_past_the_debt_limit_suspends_the_wallet(service, db):
    """A charge that leaves the balance below -debt_limit is applied in full, answers
    debt_limit_exceeded, suspends the wallet and notifies once."""
    org = open_wallet(service, balance_minor=50, debt_limit_minor=100)
    r = one(service, CHARGE, (org, "call-1", 180))  # 210
    assert (r["status"], r["amount_minor"], r["balance_minor"], r["reason"]) == (
        "applied",
        -210,
        -160,
        "debt_limit_exceeded",
    )
    assert wallet(db, org)["status"] == "suspended"
    assert len(notifications(db, org, "wallet_suspended")) == 1
    r2 = one(service, CHARGE, (org, "call-2", 60))  # deeper: still applied, still suspended
    assert (r2["status"], r2["balance_minor"], r2["reason"]) == ("applied", -230, "debt_limit_exceeded")
    assert len(notifications(db, org, "wallet_suspended")) == 1


def test_duplicate_of_a_charge_past_the_limit_returns_the_original_reason(service, db):
    """The duplicate of a charge that exceeded the debt limit answers with its original
    reason, even after credit has brought the wallet back."""
    org = open_wallet(service, debt_limit_minor=100)
    first = one(service, CHARGE, (org, "call-1", 180))
    assert first["reason"] == "debt_limit_exceeded"
    one(service, CREDIT, (org, 1000, "refill"))
    before = snapshot(db)
    again = one(service, CHARGE, (org, "call-1", 180))
    assert (again["status"], again["entry_id"], again["reason"]) == (
        "duplicate",
        first["entry_id"],
        "debt_limit_exceeded",
    )
    assert snapshot(db) == before


def test_suspended_wallet_rejects_calls_until_credit_restores_the_limit(service, db):
    """A suspended wallet refuses authorisations (wallet_suspended); a credit that leaves it
    below -debt_limit keeps it suspended; one that reaches -debt_limit reactivates it."""
    org = open_wallet(service, debt_limit_minor=100)
    one(service, CHARGE, (org, "call-1", 300))  # -350
    assert wallet(db, org)["status"] == "suspended"

    before = snapshot_without_holds(db)
    r = one(service, AUTHORIZE, (org, "call-2", 1))
    assert (r["status"], r["reason"]) == ("rejected", "wallet_suspended")
    assert snapshot_without_holds(db) == before

    partial = one(service, CREDIT, (org, 200, "credit-1"))  # -150: still past -100
    assert (partial["status"], partial["reason"]) == ("applied", "debt_limit_exceeded")
    assert wallet(db, org)["status"] == "suspended"
    r = one(service, AUTHORIZE, (org, "call-3", 1))
    assert (r["status"], r["reason"]) == ("rejected", "wallet_suspended")

    restored = one(service, CREDIT, (org, 50, "credit-2"))  # -100: exactly at the limit
    assert (restored["status"], restored["reason"]) == ("applied", None)
    assert wallet(db, org)["status"] == "active"
    # The refused call ids stay refused; a new one with room under the limit is accepted.
    assert one(service, AUTHORIZE, (org, "call-2", 1))["reason"] == "wallet_suspended"
    assert one(service, AUTHORIZE, (org, "call-4", 1))["status"] == "rejected"  # no room left
    one(service, CREDIT, (org, 70, "credit-3"))
    assert one(service, AUTHORIZE, (org, "call-5", 1))["status"] == "applied"


def test_charge_for_an_unknown_org_is_rejected(service, db):
    """An org without a wallet is rejected as unknown_org and nothing is written."""
    before = snapshot(db)
    r = one(service, CHARGE, (new_org(), "call-1", 60))
    assert (r["status"], r["reason"]) == ("rejected", "unknown_org")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("org", "call_id", "duration", "details", "field"),
    [
        (None, "call-1", 60, "{}", "org_id"),
        ("org", None, 60, "{}", "call_id"),
        ("org", "", 60, "{}", "call_id"),
        ("org", "c" * 256, 60, "{}", "call_id"),
        ("org", "call-1", -1, "{}", "duration_seconds"),
        ("org", "call-1", None, "{}", "duration_seconds"),
        ("org", "call-1", 604801, "{}", "duration_seconds"),
        ("org", "call-1", 60, "[1]", "details"),
        ("org", "call-1", 60, None, "details"),
    ],
)
def test_charge_refuses_invalid_input(service, db, org, call_id, duration, details, field):
    """Negative or absurd durations, bad call ids and non-object details raise 22023."""
    real_org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (real_org, "call-1", 1))
    before = snapshot(db)
    exc = refusal(
        service,
        "SELECT * FROM api.deduct_call_credits(%s, %s, %s::integer, %s::jsonb)",
        (real_org if org else None, call_id, duration, details),
    )
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field)
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- release_call


def test_release_frees_the_hold_of_a_call_that_never_connected(service, db):
    """release_call frees the whole hold and moves no money."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 3))
    r = one(service, RELEASE, (org, "call-1"))
    assert (r["status"], r["amount_minor"], r["balance_minor"], r["entry_id"]) == ("applied", 210, 1000, None)
    assert wallet(db, org)["held_minor"] == 0
    assert hold_row(db, "call-1")["status"] == "released"
    assert ledger_count(db, org) == 1


def test_release_twice_is_duplicate(service, db):
    """A second release answers duplicate and changes nothing."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 3))
    one(service, RELEASE, (org, "call-1"))
    before = snapshot(db)
    r = one(service, RELEASE, (org, "call-1"))
    assert (r["status"], r["reason"]) == ("duplicate", None)
    assert snapshot(db) == before


def test_release_after_the_charge_is_duplicate_already_charged(service, db):
    """Releasing a charged call changes nothing."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 3))
    one(service, CHARGE, (org, "call-1", 30))
    before = snapshot(db)
    r = one(service, RELEASE, (org, "call-1"))
    assert (r["status"], r["reason"]) == ("duplicate", "already_charged")
    assert snapshot(db) == before


def test_release_of_a_rejected_authorisation_keeps_its_reason(service, db):
    """A refused call has nothing to release; the answer repeats why it was refused."""
    org = open_wallet(service)
    one(service, AUTHORIZE, (org, "call-1", 3))
    before = snapshot(db)
    r = one(service, RELEASE, (org, "call-1"))
    assert (r["status"], r["reason"]) == ("duplicate", "insufficient_funds")
    assert snapshot(db) == before


def test_release_of_an_unknown_call_is_rejected(service, db):
    """A call never authorised cannot be released; nothing changes."""
    org = open_wallet(service, balance_minor=1000)
    before = snapshot(db)
    r = one(service, RELEASE, (org, "call-404"))
    assert (r["status"], r["reason"]) == ("rejected", "unknown_call")
    assert snapshot(db) == before


def test_release_of_another_orgs_call_is_conflict(service, db):
    """Org B cannot release org A's hold."""
    org_a = open_wallet(service, balance_minor=1000)
    org_b = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org_a, "call-1", 3))
    before = snapshot(db)
    r = one(service, RELEASE, (org_b, "call-1"))
    assert (r["status"], r["reason"]) == ("conflict", "other_org")
    assert snapshot(db) == before


def test_charge_after_release_is_still_recorded(service, db):
    """A call released too early but reported later is charged; held stays at zero."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 3))
    one(service, RELEASE, (org, "call-1"))
    r = one(service, CHARGE, (org, "call-1", 60))
    assert (r["status"], r["balance_minor"]) == ("applied", 930)
    assert wallet(db, org)["held_minor"] == 0
    assert hold_row(db, "call-1")["status"] == "released"


@pytest.mark.parametrize(
    ("org", "call_id", "field"),
    [(None, "call-1", "org_id"), ("org", None, "call_id"), ("org", "c" * 256, "call_id")],
)
def test_release_refuses_invalid_input(service, db, org, call_id, field):
    """A null org or a bad call id raise 22023 naming the field."""
    real_org = open_wallet(service, balance_minor=1000)
    before = snapshot(db)
    exc = refusal(service, RELEASE, (real_org if org else None, call_id))
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field)
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- expire_holds


def test_expired_holds_are_freed_by_expire_holds(service, db):
    """Holds past their expiry are freed (status expired); others are left alone."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-old", 2))
    one(service, AUTHORIZE, (org, "call-new", 3))
    expire_now(db, "call-old")
    assert one(service, "SELECT api.expire_holds() AS n")["n"] == 1
    assert hold_row(db, "call-old")["status"] == "expired"
    assert hold_row(db, "call-new")["status"] == "open"
    w = wallet(db, org)
    assert (w["balance_minor"], w["held_minor"]) == (1000, 210)
    before = snapshot(db)
    assert one(service, "SELECT api.expire_holds() AS n")["n"] == 0
    assert snapshot(db) == before


def test_hold_expires_after_max_minutes_plus_grace(service, db):
    """A call hold lasts its maximum duration plus the operator's grace period."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 4))
    row = one(
        db,
        "SELECT expires_at - created_at AS ttl, (SELECT hold_grace FROM billing.settings) AS grace"
        " FROM billing.holds WHERE ref = 'call-1'",
    )
    assert row["ttl"] - row["grace"] == timedelta(minutes=4)


def test_late_report_of_an_expired_call_is_still_charged(service, db):
    """A call whose hold expired is charged when its report finally arrives."""
    org = open_wallet(service, balance_minor=1000)
    one(service, AUTHORIZE, (org, "call-1", 2))
    expire_now(db, "call-1")
    one(service, "SELECT api.expire_holds()")
    r = one(service, CHARGE, (org, "call-1", 60))
    assert (r["status"], r["balance_minor"]) == ("applied", 930)
    assert wallet(db, org)["held_minor"] == 0
    assert hold_row(db, "call-1")["status"] == "expired"
