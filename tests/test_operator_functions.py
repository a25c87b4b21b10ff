"""What operators use to put things right: signed adjustments and discarding an event."""

import psycopg
import pytest

from tests.db_helpers import open_wallet, snapshot, wallet
from tests.senders import paid_checkout, post_stripe, stripe_event


def adjust(conn, org, amount, key="ticket-1", note="ticket 1: double-billed call"):
    return conn.execute(
        "SELECT * FROM api.adjust_wallet(%s, %s::bigint, %s, %s)", (org, amount, key, note)
    ).fetchone()


def test_adjustment_debits_and_credits_once_per_key(service, db):
    org = open_wallet(service, balance_minor=1_000)
    first = adjust(service, org, -250)
    assert first["status"] == "applied" and first["balance_minor"] == 750
    again = adjust(service, org, -250)
    assert again["status"] == "duplicate" and again["entry_id"] == first["entry_id"]
    assert adjust(service, org, -300)["status"] == "conflict"
    assert adjust(service, org, 100, key="ticket-2")["balance_minor"] == 850
    entry = db.execute("SELECT * FROM billing.ledger_entries WHERE id = %s", (first["entry_id"],)).fetchone()
    assert entry["kind"] == "adjustment" and entry["details"]["note"].startswith("ticket 1")
    assert wallet(db, org)["balance_minor"] == 850


@pytest.mark.parametrize(
    ("amount", "note", "field"),
    [(0, "why", "amount_minor"), (-5, "", "note"), (10**16, "why", "amount_minor")],
)
def test_invalid_adjustment_is_22023_and_changes_nothing(service, db, amount, note, field):
    org = open_wallet(service, balance_minor=1_000)
    before = snapshot(db)
    with pytest.raises(psycopg.errors.InvalidParameterValue) as raised:
        adjust(service, org, amount, note=note)
    assert raised.value.diag.column_name == field
    assert snapshot(db) == before


def test_discarded_event_stops_alerting_and_moves_no_money(client, service, db):
    import uuid

    session, _ = paid_checkout(uuid.uuid4(), 2500)  # an org that will never exist
    post_stripe(client, stripe_event("checkout.session.completed", session))
    db.execute("UPDATE billing.webhook_events SET status = 'dead', next_attempt_at = NULL")
    row = db.execute("SELECT id FROM billing.webhook_events").fetchone()
    before = db.execute("SELECT count(*) AS n FROM billing.ledger_entries").fetchone()["n"]
    answer = service.execute(
        "SELECT api.discard_webhook_event(%s, 'test event from staging') AS a", (row["id"],)
    ).fetchone()["a"]
    assert answer["status"] == "ignored"
    firing = service.execute(
        "SELECT firing FROM api.health_alerts() WHERE alert = 'WebhookDeadLetters' AND provider = 'stripe'"
    ).fetchone()["firing"]
    assert firing is False
    assert db.execute("SELECT count(*) AS n FROM billing.ledger_entries").fetchone()["n"] == before
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        service.execute("SELECT api.discard_webhook_event(%s, 'again')", (row["id"],))
