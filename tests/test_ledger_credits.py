"""Wallets, credits and the append-only ledger: each rule, and that a refusal changes nothing."""

import uuid

import pytest

from tests.db_helpers import (
    ledger_count,
    new_org,
    notifications,
    one,
    open_wallet,
    refusal,
    snapshot,
    wallet,
)

CREDIT = "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)"
CREDIT_REF = "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s, 'top_up', 'stripe', %s)"
CHARGE = "SELECT * FROM api.deduct_call_credits(%s, %s, %s)"
MAX_MINOR = 10**15


# ---------------------------------------------------------------------------- open_wallet


def test_open_wallet_twice_returns_the_same_wallet_unchanged(service, db):
    """Opening an existing wallet is a no-op that returns it, whatever the other arguments."""
    org = new_org()
    first = one(service, "SELECT * FROM api.open_wallet(%s, 'usd', 100::bigint)", (org,))
    assert (first["balance_minor"], first["held_minor"], first["available_minor"]) == (0, 0, 0)
    assert (first["debt_limit_minor"], first["status"], first["currency"]) == (100, "active", "usd")
    before = snapshot(db)
    again = one(service, "SELECT * FROM api.open_wallet(%s, 'usd', 999::bigint)", (org,))
    assert again == first
    assert snapshot(db) == before


def test_open_wallet_in_another_currency_is_invalid(service, db):
    """A second open in a different currency raises 22023 on currency and changes nothing."""
    org = open_wallet(service)
    before = snapshot(db)
    exc = refusal(service, "SELECT * FROM api.open_wallet(%s, 'eur')", (org,))
    assert exc.sqlstate == "22023"
    assert exc.diag.column_name == "currency"
    assert snapshot(db) == before


@pytest.mark.parametrize("currency", ["USD", "us", "usdx", "", None, "u$d"])
def test_open_wallet_refuses_a_bad_currency(service, db, currency):
    """A currency that is not a lowercase three-letter code is invalid input."""
    before = snapshot(db)
    exc = refusal(service, "SELECT * FROM api.open_wallet(%s, %s)", (new_org(), currency))
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", "currency")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("org", "debt_limit", "field"),
    [
        (None, 0, "org_id"),
        ("new", -1, "debt_limit_minor"),
        ("new", MAX_MINOR + 1, "debt_limit_minor"),
        ("new", None, "debt_limit_minor"),
    ],
)
def test_open_wallet_refuses_invalid_input(service, db, org, debt_limit, field):
    """A null org or a debt limit outside 0..10^15 raises 22023 naming the field."""
    before = snapshot(db)
    exc = refusal(
        service,
        "SELECT * FROM api.open_wallet(%s, 'usd', %s::bigint)",
        (new_org() if org == "new" else org, debt_limit),
    )
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field)
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- add_wallet_credits


def test_credit_is_applied_once_with_its_entry(service, db):
    """A credit posts one entry, moves the balance and answers applied with the new balance."""
    org = open_wallet(service)
    r = one(service, CREDIT, (org, 2500, "top-up-1"))
    assert (r["status"], r["amount_minor"], r["balance_minor"], r["reason"]) == ("applied", 2500, 2500, None)
    entry = one(db, "SELECT * FROM billing.ledger_entries WHERE id = %s", (r["entry_id"],))
    assert (entry["org_id"], entry["amount_minor"], entry["balance_after_minor"]) == (org, 2500, 2500)
    assert (entry["kind"], entry["source"], entry["currency"]) == ("top_up", "manual", "usd")
    assert wallet(db, org)["balance_minor"] == 2500


def test_same_credit_twice_is_duplicate_with_the_original_entry(service, db):
    """The same request again answers duplicate with the original entry and changes nothing."""
    org = open_wallet(service)
    first = one(service, CREDIT, (org, 700, "top-up-1"))
    before = snapshot(db)
    again = one(service, CREDIT, (org, 700, "top-up-1"))
    assert again["status"] == "duplicate"
    assert (again["entry_id"], again["amount_minor"], again["balance_minor"]) == (first["entry_id"], 700, 700)
    assert snapshot(db) == before


def test_same_key_with_a_different_amount_is_conflict(service, db):
    """A key reused for another amount is a conflict and changes nothing."""
    org = open_wallet(service)
    first = one(service, CREDIT, (org, 700, "top-up-1"))
    before = snapshot(db)
    r = one(service, CREDIT, (org, 701, "top-up-1"))
    assert (r["status"], r["reason"], r["balance_minor"]) == ("conflict", "different_request", 700)
    assert r["entry_id"] == first["entry_id"]
    assert snapshot(db) == before


def test_same_provider_reference_under_another_key_is_conflict(service, db):
    """One provider object credits once: the same reference under a new key is a conflict."""
    org = open_wallet(service)
    one(service, CREDIT_REF, (org, 700, "key-1", "stripe:payment_intent:pi_1"))
    before = snapshot(db)
    r = one(service, CREDIT_REF, (org, 700, "key-2", "stripe:payment_intent:pi_1"))
    assert (r["status"], r["reason"]) == ("conflict", "different_request")
    assert snapshot(db) == before


def test_same_provider_reference_in_another_org_is_conflict(service, db):
    """A provider object credited to org A can never credit org B; B learns nothing of A."""
    org_a, org_b = open_wallet(service), open_wallet(service)
    one(service, CREDIT_REF, (org_a, 700, "key-1", "stripe:payment_intent:pi_1"))
    before = snapshot(db)
    r = one(service, CREDIT_REF, (org_b, 700, "key-1", "stripe:payment_intent:pi_1"))
    assert (r["status"], r["reason"], r["entry_id"], r["amount_minor"], r["balance_minor"]) == (
        "conflict",
        "other_org",
        None,
        None,
        0,
    )
    assert snapshot(db) == before


def test_idempotency_keys_are_scoped_to_their_org(service, db):
    """Without a provider reference a key is per org (UNIQUE (org_id, idempotency_key))."""
    org_a, org_b = open_wallet(service), open_wallet(service)
    a = one(service, CREDIT, (org_a, 300, "monthly-promo"))
    b = one(service, CREDIT, (org_b, 300, "monthly-promo"))
    assert (a["status"], b["status"]) == ("applied", "applied")
    assert a["entry_id"] != b["entry_id"]
    assert (wallet(db, org_a)["balance_minor"], wallet(db, org_b)["balance_minor"]) == (300, 300)


def test_credit_to_an_unknown_org_is_rejected(service, db):
    """An org without a wallet is rejected as unknown_org and nothing is written."""
    before = snapshot(db)
    r = one(service, CREDIT, (new_org(), 100, "k"))
    assert (r["status"], r["reason"], r["entry_id"]) == ("rejected", "unknown_org", None)
    assert snapshot(db) == before


def test_every_credit_kind_is_accepted(service, db):
    """Each credit kind of the contract posts a positive entry of that kind."""
    org = open_wallet(service)
    kinds = ["top_up", "auto_recharge", "promo", "adjustment", "refund_reversal", "dispute_reversal"]
    for i, kind in enumerate(kinds):
        r = one(
            service,
            "SELECT * FROM api.add_wallet_credits(%s, 10::bigint, %s, %s)",
            (org, f"k{i}", kind),
        )
        assert r["status"] == "applied"
    rows = db.execute(
        "SELECT kind FROM billing.ledger_entries WHERE org_id = %s ORDER BY id", (org,)
    ).fetchall()
    assert [row["kind"] for row in rows] == kinds


def test_boundary_amount_and_key_length_are_accepted(service, db):
    """10^15 minor units and a 255-character key are the largest valid values."""
    org = open_wallet(service)
    r = one(service, CREDIT, (org, MAX_MINOR, "k" * 255))
    assert (r["status"], r["balance_minor"]) == ("applied", MAX_MINOR)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"amount_minor": 0}, "amount_minor"),
        ({"amount_minor": -1}, "amount_minor"),
        ({"amount_minor": None}, "amount_minor"),
        ({"amount_minor": MAX_MINOR + 1}, "amount_minor"),
        ({"idempotency_key": None}, "idempotency_key"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"kind": "call_charge"}, "kind"),
        ({"kind": "refund"}, "kind"),
        ({"kind": "gift"}, "kind"),
        ({"kind": None}, "kind"),
        ({"source": "paypal"}, "source"),
        ({"source_ref": "r" * 256}, "source_ref"),
        ({"source_ref": ""}, "source_ref"),
        ({"details": "[]"}, "details"),
        ({"details": None}, "details"),
        ({"org_id": None}, "org_id"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={str(x)[:8]}" for k, x in v.items()),
)
def test_credit_refuses_invalid_input(service, db, args, field):
    """Zero, negative, null or oversized amounts, bad keys, kinds, sources and details raise
    22023 with the field in the error's COLUMN, and change nothing."""
    org = open_wallet(service, balance_minor=100)
    params = {
        "org_id": org,
        "amount_minor": 100,
        "idempotency_key": "k",
        "kind": "top_up",
        "source": "manual",
        "source_ref": None,
        "details": "{}",
    } | args
    before = snapshot(db)
    exc = refusal(
        service,
        "SELECT * FROM api.add_wallet_credits(%(org_id)s, %(amount_minor)s::bigint,"
        " %(idempotency_key)s, %(kind)s, %(source)s, %(source_ref)s, %(details)s::jsonb)",
        params,
    )
    assert exc.sqlstate == "22023"
    assert exc.diag.column_name == field
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- append-only ledger


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE billing.ledger_entries SET amount_minor = amount_minor + 1",
        "UPDATE billing.ledger_entries SET details = '{\"edited\": true}'",
        "DELETE FROM billing.ledger_entries",
        "TRUNCATE billing.ledger_entries",
        "TRUNCATE billing.wallets CASCADE",
    ],
)
def test_ledger_is_append_only_even_for_the_superuser(service, db, statement):
    """UPDATE, DELETE and TRUNCATE (also by cascade) on the ledger raise 55000 as superuser."""
    org = open_wallet(service, balance_minor=500)
    one(service, CHARGE, (org, "call-1", 30))
    before = snapshot(db)
    assert one(db, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user")["rolsuper"]
    exc = refusal(db, statement)
    assert exc.sqlstate == "55000"
    assert snapshot(db) == before
    assert ledger_count(db, org) == 2


# ---------------------------------------------------------------------------- low balance


def test_low_balance_is_notified_once_per_crossing(service, db):
    """Going below the threshold notifies once, however many charges follow; climbing back
    above and crossing again notifies again."""
    org = open_wallet(service, balance_minor=1000)
    one(service, "SELECT * FROM api.set_low_balance_threshold(%s, 500::bigint)", (org,))
    assert notifications(db, org, "low_balance") == []

    one(service, CHARGE, (org, "c1", 300))  # 1000 - 350 = 650: above
    assert notifications(db, org, "low_balance") == []
    one(service, CHARGE, (org, "c2", 300))  # 300: crossed
    one(service, CHARGE, (org, "c3", 60))  # 230: still below
    one(service, CHARGE, (org, "c4", 60))  # 160
    crossed = notifications(db, org, "low_balance")
    assert len(crossed) == 1
    assert crossed[0]["details"] == {"balance_minor": 300, "threshold_minor": 500}

    one(service, CREDIT, (org, 1000, "refill"))  # 1160: back above
    assert len(notifications(db, org, "low_balance")) == 1
    one(service, CHARGE, (org, "c5", 600))  # 460: crossed again
    assert len(notifications(db, org, "low_balance")) == 2


def test_setting_the_same_threshold_again_does_not_notify_again(service, db):
    """A threshold set while below notifies once; re-sending the same setting is no crossing."""
    org = open_wallet(service, balance_minor=100)
    one(service, "SELECT * FROM api.set_low_balance_threshold(%s, 500::bigint)", (org,))
    assert len(notifications(db, org, "low_balance")) == 1
    one(service, "SELECT * FROM api.set_low_balance_threshold(%s, 500::bigint)", (org,))
    one(service, CHARGE, (org, "c1", 10))
    assert len(notifications(db, org, "low_balance")) == 1
    # A different threshold is a new setting: being below it is news.
    one(service, "SELECT * FROM api.set_low_balance_threshold(%s, 400::bigint)", (org,))
    assert len(notifications(db, org, "low_balance")) == 2


def test_clearing_the_threshold_stops_notifications(service, db):
    """A null threshold switches low-balance notifications off."""
    org = open_wallet(service, balance_minor=1000)
    w = one(service, "SELECT * FROM api.set_low_balance_threshold(%s, NULL)", (org,))
    assert w["low_balance_threshold_minor"] is None
    one(service, CHARGE, (org, "c1", 600))
    assert notifications(db, org, "low_balance") == []


@pytest.mark.parametrize("threshold", [0, -5, MAX_MINOR + 1])
def test_low_balance_threshold_must_be_a_positive_amount(service, db, threshold):
    """A threshold that is not a positive amount raises 22023 on threshold_minor."""
    org = open_wallet(service)
    before = snapshot(db)
    exc = refusal(service, "SELECT * FROM api.set_low_balance_threshold(%s, %s::bigint)", (org, threshold))
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", "threshold_minor")
    assert snapshot(db) == before


def test_low_balance_threshold_of_an_unknown_org_is_invalid(service, db):
    """Setting a threshold for an org without a wallet raises 22023 on org_id."""
    exc = refusal(service, "SELECT * FROM api.set_low_balance_threshold(%s, 100::bigint)", (uuid.uuid4(),))
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", "org_id")


# ---------------------------------------------------------------------------- pricing


@pytest.mark.parametrize(
    ("rate", "increment", "sms", "field"),
    [
        (-1, 1, 1, "rate_per_minute_minor"),
        (70, 0, 1, "billing_increment_seconds"),
        (70, 3601, 1, "billing_increment_seconds"),
        (70, 1, -1, "sms_segment_minor"),
    ],
)
def test_set_pricing_refuses_invalid_prices(service, db, rate, increment, sms, field):
    """Negative rates and increments outside 1..3600 s raise 22023 naming the field."""
    org = open_wallet(service)
    before = snapshot(db)
    exc = refusal(
        service,
        "SELECT * FROM api.set_pricing(%s, %s::bigint, %s::integer, %s::bigint)",
        (org, rate, increment, sms),
    )
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field)
    assert snapshot(db) == before
