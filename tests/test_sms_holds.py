"""Outbound SMS: register_sms holds the cost; Twilio's status callback charges or frees it."""

import itertools

import pytest

from tests.db_helpers import (
    hold_row,
    ledger_count,
    new_org,
    one,
    open_wallet,
    refusal,
    snapshot,
    snapshot_without_holds,
    wallet,
)

REGISTER = "SELECT * FROM api.register_sms(%s, %s, %s::integer)"
CREDIT = "SELECT * FROM api.add_wallet_credits(%s, %s::bigint, %s)"
_event_ids = itertools.count(1)


def sms_status(service, message_sid, status):
    """Deliver one Twilio status callback (a fresh event id, as Twilio sends) and return the
    op_result it applied, as a dict."""
    outcome = one(
        service,
        "SELECT api.ingest_webhook('twilio', %s, 'sms-status', %s::jsonb) AS o",
        (f"evt-{next(_event_ids)}", f'{{"MessageSid": "{message_sid}", "MessageStatus": "{status}"}}'),
    )["o"]
    assert outcome["status"] == "processed", outcome
    return outcome["result"]


def money(db, *tables):
    """wallets, ledger_entries and holds (or the tables named): a callback always adds an
    inbox row, so "nothing changed" is about these."""
    snap = snapshot(db)
    return {t: snap[t] for t in tables or ("wallets", "ledger_entries", "holds")}


def priced_wallet(service, balance_minor=1000, **kwargs):
    """A wallet whose SMS segments cost 4 minor units."""
    return open_wallet(service, balance_minor=balance_minor, sms_segment_minor=4, **kwargs)


# ---------------------------------------------------------------------------- register_sms


def test_registered_sms_holds_segments_times_rate(service, db):
    """The hold is segments x the org's per-segment price; the balance is untouched."""
    org = priced_wallet(service)
    r = one(service, REGISTER, (org, "SM1", 3))
    assert (r["status"], r["amount_minor"], r["balance_minor"]) == ("applied", 12, 1000)
    w = wallet(db, org)
    assert (w["balance_minor"], w["held_minor"]) == (1000, 12)
    assert hold_row(db, "SM1", "sms")["status"] == "open"


def test_same_sms_registered_twice_is_duplicate(service, db):
    """Registering the same message again holds nothing more."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 3))
    before = snapshot(db)
    r = one(service, REGISTER, (org, "SM1", 3))
    assert (r["status"], r["amount_minor"]) == ("duplicate", 12)
    assert snapshot(db) == before


def test_same_sms_with_other_segments_is_conflict(service, db):
    """The same message sid with another segment count is a conflict."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 3))
    before = snapshot(db)
    r = one(service, REGISTER, (org, "SM1", 4))
    assert (r["status"], r["reason"]) == ("conflict", "different_request")
    assert snapshot(db) == before


def test_same_sms_in_another_org_is_conflict(service, db):
    """A Twilio message belongs to one org."""
    org_a, org_b = priced_wallet(service), priced_wallet(service)
    one(service, REGISTER, (org_a, "SM1", 1))
    before = snapshot(db)
    r = one(service, REGISTER, (org_b, "SM1", 1))
    assert (r["status"], r["reason"]) == ("conflict", "other_org")
    assert snapshot(db) == before


def test_sms_beyond_available_funds_is_rejected_and_stays_rejected(service, db):
    """Without room the SMS is refused; after credit, its retry is still refused."""
    org = priced_wallet(service, balance_minor=10)
    before = snapshot_without_holds(db)
    r = one(service, REGISTER, (org, "SM1", 3))  # 12 > 10
    assert (r["status"], r["reason"]) == ("rejected", "insufficient_funds")
    assert snapshot_without_holds(db) == before
    one(service, CREDIT, (org, 100, "refill"))
    before = snapshot(db)
    r = one(service, REGISTER, (org, "SM1", 3))
    assert (r["status"], r["reason"]) == ("duplicate", "insufficient_funds")
    assert snapshot(db) == before


def test_sms_on_a_suspended_wallet_is_rejected(service, db):
    """A suspended wallet sends no SMS."""
    org = priced_wallet(service, balance_minor=0)
    one(service, "SELECT * FROM api.deduct_call_credits(%s, 'call-1', 60)", (org,))
    assert wallet(db, org)["status"] == "suspended"
    before = snapshot_without_holds(db)
    r = one(service, REGISTER, (org, "SM1", 1))
    assert (r["status"], r["reason"]) == ("rejected", "wallet_suspended")
    assert snapshot_without_holds(db) == before


def test_sms_for_an_unknown_org_is_rejected(service, db):
    """An org without a wallet is rejected as unknown_org."""
    before = snapshot(db)
    r = one(service, REGISTER, (new_org(), "SM1", 1))
    assert (r["status"], r["reason"]) == ("rejected", "unknown_org")
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("org", "sid", "segments", "field"),
    [
        (None, "SM1", 1, "org_id"),
        ("org", None, 1, "message_sid"),
        ("org", "", 1, "message_sid"),
        ("org", "S" * 256, 1, "message_sid"),
        ("org", "SM1", 0, "segments"),
        ("org", "SM1", -1, "segments"),
        ("org", "SM1", 101, "segments"),
        ("org", "SM1", None, "segments"),
    ],
)
def test_register_sms_refuses_invalid_input(service, db, org, sid, segments, field):
    """Bad message sids and segment counts outside 1..100 raise 22023 naming the field."""
    real_org = priced_wallet(service)
    before = snapshot(db)
    exc = refusal(service, REGISTER, (real_org if org else None, sid, segments))
    assert (exc.sqlstate, exc.diag.column_name) == ("22023", field)
    assert snapshot(db) == before


# ---------------------------------------------------------------------------- status callbacks


@pytest.mark.parametrize("status", ["sent", "delivered", "undelivered"])
def test_sent_or_delivered_charges_the_held_cost(service, db, status):
    """A sent, delivered or undelivered callback (delivery attempted: Twilio bills it) charges
    the held cost and frees the hold."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 3))
    r = sms_status(service, "SM1", status)
    assert (r["status"], r["amount_minor"], r["balance_minor"]) == ("applied", -12, 988)
    w = wallet(db, org)
    assert (w["balance_minor"], w["held_minor"]) == (988, 0)
    assert hold_row(db, "SM1", "sms")["status"] == "captured"


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_failed_sms_frees_its_hold_without_charge(service, db, status):
    """A failed or canceled message never left Twilio: it costs nothing and frees its hold
    (undelivered is charged: tests/test_sms_status_rules.py)."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 3))
    r = sms_status(service, "SM1", status)
    assert (r["status"], r["amount_minor"], r["balance_minor"]) == ("applied", 12, 1000)
    assert wallet(db, org)["held_minor"] == 0
    assert hold_row(db, "SM1", "sms")["status"] == "released"
    assert ledger_count(db, org) == 1


def test_sent_then_delivered_charges_once(service, db):
    """sent and then delivered: one charge between them."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 2))
    first = sms_status(service, "SM1", "sent")
    before = money(db, "wallets", "ledger_entries")
    second = sms_status(service, "SM1", "delivered")
    assert second["status"] == "duplicate"
    assert money(db, "wallets", "ledger_entries") == before
    assert wallet(db, org)["balance_minor"] == 1000 - 8
    assert ledger_count(db, org) == 2
    assert first["status"] == "applied"


def test_late_callback_never_regresses_a_terminal_status(service, db):
    """Callbacks arriving out of order (queued, sent after delivered) change nothing."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 2))
    sms_status(service, "SM1", "delivered")
    for late in ["sent", "queued", "failed", "delivered"]:
        before = money(db)
        r = sms_status(service, "SM1", late)
        assert r["status"] == "duplicate"
        assert money(db) == before
    assert hold_row(db, "SM1", "sms")["provider_status"] == "delivered"
    assert wallet(db, org)["balance_minor"] == 992


def test_failed_then_delivered_charges_nothing(service, db):
    """Once failed (terminal), a stray delivered callback charges nothing."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 2))
    sms_status(service, "SM1", "failed")
    before = money(db)
    r = sms_status(service, "SM1", "delivered")
    assert r["status"] == "duplicate"
    assert money(db) == before


def test_failure_of_a_free_sms_is_applied_not_duplicate(service, db):
    """A 0-cost hold freed by its first failure callback is applied; its repeat is duplicate."""
    org = open_wallet(service, balance_minor=100, sms_segment_minor=0)
    one(service, REGISTER, (org, "SM1", 1))
    r = sms_status(service, "SM1", "failed")
    assert (r["status"], r["amount_minor"]) == ("applied", 0)
    assert hold_row(db, "SM1", "sms")["status"] == "released"
    assert sms_status(service, "SM1", "undelivered")["status"] == "duplicate"


def test_refused_sms_that_was_sent_anyway_is_charged(service, db):
    """A message Twilio sent is owed even if its hold was refused; held stays at zero."""
    org = priced_wallet(service, balance_minor=5)
    one(service, REGISTER, (org, "SM1", 3))
    r = sms_status(service, "SM1", "delivered")
    assert (r["status"], r["amount_minor"], r["balance_minor"]) == ("applied", -12, -7)
    assert wallet(db, org)["held_minor"] == 0


def test_unregistered_sms_callback_waits_for_the_worker(service, db):
    """A callback for a message not registered yet is stored failed (retried), not applied."""
    outcome = one(
        service,
        "SELECT api.ingest_webhook('twilio', 'evt-x', 'sms-status',"
        ' \'{"MessageSid": "SM404", "MessageStatus": "delivered"}\') AS o',
    )["o"]
    assert outcome["status"] == "failed"
    assert ledger_count(db) == 0


# ---------------------------------------------------------------------------- expiry


def test_expired_sms_hold_is_freed(service, db):
    """An SMS never reported frees its hold once past its expiry."""
    org = priced_wallet(service)
    one(service, REGISTER, (org, "SM1", 3))
    db.execute("UPDATE billing.holds SET expires_at = now() - interval '1 second' WHERE ref = 'SM1'")
    assert one(service, "SELECT api.expire_holds() AS n")["n"] == 1
    assert hold_row(db, "SM1", "sms")["status"] == "expired"
    assert wallet(db, org)["held_minor"] == 0
    # A very late delivered callback is still charged once.
    assert sms_status(service, "SM1", "delivered")["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 988
