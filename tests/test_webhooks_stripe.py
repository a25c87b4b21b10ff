"""Stripe events through the real HTTP stack: credited exactly once, whatever the order."""

import json
import time

import pytest

from shim.fakes import payloads
from tests.db_helpers import ledger_count, open_wallet, snapshot, wallet
from tests.senders import paid_checkout, post_stripe, stripe_event


def event_row(db, event_id):
    return db.execute("SELECT * FROM billing.webhook_events WHERE event_id = %s", (event_id,)).fetchone()


def test_checkout_completion_credits_the_org(client, service, db):
    org = open_wallet(service)
    session, pi = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    answer = post_stripe(client, event)
    assert answer.status_code == 200
    assert answer.json["status"] == "processed"
    assert answer.json["result"]["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 2500
    entry = db.execute("SELECT * FROM billing.ledger_entries WHERE org_id = %s", (org,)).fetchone()
    assert entry["provider_ref"] == f"stripe:payment_intent:{pi}"
    assert entry["kind"] == "top_up"
    assert event_row(db, event["id"])["status"] == "processed"


def test_redelivery_is_a_duplicate_and_changes_nothing(client, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    assert post_stripe(client, event).status_code == 200
    before = snapshot(db)
    again = post_stripe(client, event)
    assert again.status_code == 200
    assert again.json["status"] == "duplicate"
    assert snapshot(db) == before


def test_checkout_and_payment_intent_events_credit_once(client, service, db):
    """Both events describe one payment: keyed on the PaymentIntent, whichever comes first."""
    org = open_wallet(service)
    session, pi = paid_checkout(org, 4000)
    intent = payloads.stripe_payment_intent(pi_id=pi, org_id=str(org), amount=4000)
    assert (
        post_stripe(client, stripe_event("payment_intent.succeeded", intent)).json["result"]["status"]
        == "applied"
    )
    second = post_stripe(client, stripe_event("checkout.session.completed", session))
    assert second.json["result"]["status"] == "duplicate"
    assert wallet(db, org)["balance_minor"] == 4000
    assert ledger_count(db, org) == 1


def test_async_payment_waits_for_success_event(client, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 3000)
    unpaid = dict(session, payment_status="unpaid")
    first = post_stripe(client, stripe_event("checkout.session.completed", unpaid))
    assert first.json["status"] == "ignored"
    assert wallet(db, org)["balance_minor"] == 0
    later = post_stripe(client, stripe_event("checkout.session.async_payment_succeeded", session))
    assert later.json["result"]["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 3000


def test_fully_discounted_session_is_ignored_not_failed(client, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 0)
    event = stripe_event("checkout.session.completed", session)
    assert post_stripe(client, event).json["status"] == "ignored"
    row = event_row(db, event["id"])
    assert row["status"] == "ignored" and row["next_attempt_at"] is None


def test_refund_debits_per_refund_id_not_cumulative(client, service, db):
    org = open_wallet(service)
    session, pi = paid_checkout(org, 5000)
    post_stripe(client, stripe_event("checkout.session.completed", session))
    charge_id = payloads.stripe_id("ch_")
    first = payloads.stripe_refund(
        refund_id=payloads.stripe_id("re_"), payment_intent=pi, charge=charge_id, amount=1000
    )
    second = payloads.stripe_refund(
        refund_id=payloads.stripe_id("re_"), payment_intent=pi, charge=charge_id, amount=500
    )
    # charge.refunded after the second refund lists both, with amount_refunded = 1500.
    charge = payloads.stripe_charge(
        charge_id=charge_id, payment_intent=pi, amount=5000, amount_refunded=1500, refunds=[first, second]
    )
    post_stripe(client, stripe_event("refund.created", first))
    post_stripe(client, stripe_event("charge.refunded", charge))
    post_stripe(client, stripe_event("refund.created", second))
    assert wallet(db, org)["balance_minor"] == 5000 - 1500
    kinds = db.execute(
        "SELECT kind, amount_minor FROM billing.ledger_entries WHERE org_id = %s ORDER BY id", (org,)
    ).fetchall()
    assert [k["amount_minor"] for k in kinds] == [5000, -1000, -500]


def test_refund_before_its_payment_is_kept_for_the_worker(client, service, db):
    """Out of order: the refund cannot be attributed yet, so it is stored as failed (never
    applied to a guessed org); once the payment is credited, the worker's retry applies it."""
    org = open_wallet(service)
    session, pi = paid_checkout(org, 5000)
    refund = payloads.stripe_refund(
        refund_id=payloads.stripe_id("re_"), payment_intent=pi, charge=payloads.stripe_id("ch_"), amount=2000
    )
    early = stripe_event("refund.created", refund)
    answer = post_stripe(client, early)
    assert answer.status_code == 200 and answer.json["status"] == "failed"
    assert ledger_count(db) == 0

    post_stripe(client, stripe_event("checkout.session.completed", session))
    db.execute(
        "UPDATE billing.webhook_events SET next_attempt_at = now() WHERE event_id = %s", (early["id"],)
    )
    counts = service.execute("SELECT api.retry_webhook_events(10) AS c").fetchone()["c"]
    assert counts == {"processed": 1}
    assert wallet(db, org)["balance_minor"] == 3000


def test_dispute_withdrawn_then_won_nets_to_zero(client, service, db):
    org = open_wallet(service)
    session, pi = paid_checkout(org, 5000)
    post_stripe(client, stripe_event("checkout.session.completed", session))
    dispute = payloads.stripe_dispute(
        dispute_id=payloads.stripe_id("dp_"), payment_intent=pi, charge=payloads.stripe_id("ch_"), amount=5000
    )
    post_stripe(client, stripe_event("charge.dispute.created", dispute))
    post_stripe(client, stripe_event("charge.dispute.funds_withdrawn", dispute))
    assert wallet(db, org)["balance_minor"] == 0
    won = dict(dispute, status="won")
    post_stripe(client, stripe_event("charge.dispute.funds_reinstated", won))
    post_stripe(client, stripe_event("charge.dispute.closed", won))
    assert wallet(db, org)["balance_minor"] == 5000
    assert ledger_count(db, org) == 3


def test_currency_mismatch_is_stored_not_applied_and_raised(client, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500, currency="eur")
    event = stripe_event("checkout.session.completed", session)
    answer = post_stripe(client, event)
    assert answer.json["status"] == "ignored"
    assert wallet(db, org)["balance_minor"] == 0
    assert db.execute("SELECT kind FROM billing.discrepancies").fetchone()["kind"] == "currency_mismatch"


def test_unknown_event_type_is_ignored(client, db):
    event = stripe_event("customer.created", {"id": "cus_123", "object": "customer"})
    assert post_stripe(client, event).json["status"] == "ignored"
    assert event_row(db, event["id"])["status"] == "ignored"


def test_sql_looking_metadata_is_just_data(client, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 1500)
    session["metadata"]["note"] = "'); DROP TABLE billing.ledger_entries; --"
    session["client_reference_id"] = str(org)
    answer = post_stripe(client, stripe_event("checkout.session.completed", session))
    assert answer.json["result"]["status"] == "applied"
    assert ledger_count(db) == 1


def test_org_id_that_is_not_a_uuid_is_unattributed(client, db):
    session, _ = paid_checkout("not-a-uuid'; --", 1500)
    answer = post_stripe(client, stripe_event("checkout.session.completed", session))
    assert answer.json["status"] == "unattributed"
    assert ledger_count(db) == 0


@pytest.mark.parametrize("tamper", ["body", "secret", "stale", "missing"])
def test_bad_signature_is_400_and_stores_nothing(client, service, db, tamper):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    body = json.dumps(event).encode()
    before = snapshot(db)
    if tamper == "body":
        header = payloads.sign_stripe(body, "whsec_test_secret", int(time.time()))
        answer = client.post(
            "/webhooks/stripe",
            data=body.replace(b"2500", b"9999"),
            content_type="application/json",
            headers={"Stripe-Signature": header},
        )
    elif tamper == "secret":
        answer = post_stripe(client, event, secret="whsec_wrong")
    elif tamper == "stale":
        answer = post_stripe(client, event, timestamp=int(time.time()) - 301)
    else:
        answer = client.post("/webhooks/stripe", data=body, content_type="application/json")
    assert answer.status_code == 400
    assert answer.json["error"] == "bad_signature"
    assert snapshot(db) == before


def test_signed_body_that_is_not_json_is_400(client, db):
    answer = post_stripe(client, {}, body=b"this is not json")
    assert answer.status_code == 400
    assert db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"] == 0


def test_body_over_one_mebibyte_is_413(client, db):
    huge = {"id": "evt_huge", "type": "checkout.session.completed", "pad": "x" * (1024 * 1024)}
    answer = post_stripe(client, huge)
    assert answer.status_code == 413
    assert db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"] == 0


def test_missing_secret_disables_only_that_endpoint(shim_config, db_url, service):
    import dataclasses

    from shim.app import create_app
    from shim.pool import open_pool

    config = dataclasses.replace(shim_config, stripe_webhook_secret=None)
    pool = open_pool(db_url)
    pool.open(wait=True)
    try:
        client = create_app(config, pool=pool).test_client()
        answer = post_stripe(client, stripe_event("customer.created", {"id": "cus_1"}))
        assert answer.status_code == 503 and "STRIPE_WEBHOOK_SECRET" in answer.json["message"]
        assert client.get("/healthz").status_code == 200
    finally:
        pool.close()
