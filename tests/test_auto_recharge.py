"""Auto-recharge: one claim per low balance, one PaymentIntent per claim, no retry storm."""

import concurrent.futures
import dataclasses
import uuid

import psycopg
import pytest

from shim.recharge import charge_claim, process_claims
from shim.stripe_client import make_client
from shim.worker import run_once
from tests.db_helpers import as_user, ledger_count, open_wallet, wallet

CUSTOMER, CARD = "cus_RechargeTest01", "pm_card_visa_recharge"


def recharging_org(service, db, balance=3_000, threshold=1_000, amount=2_000, card=CARD):
    """An org with a saved card and auto-recharge on (configured by its owner)."""
    org = open_wallet(service, balance_minor=balance)
    service.execute("SELECT * FROM api.set_payment_method(%s, %s, %s)", (org, CUSTOMER, card))
    with as_user(db, org, "owner", commit=True) as conn:
        conn.execute(
            "SELECT * FROM api.configure_auto_recharge(true, %s::bigint, %s::bigint)", (threshold, amount)
        )
    return org


def charge_call(conn, org, seconds, call_id=None):
    return conn.execute(
        "SELECT * FROM api.deduct_call_credits(%s, %s, %s)", (org, call_id or f"call-{uuid.uuid4()}", seconds)
    ).fetchone()


def claims(db, org):
    return db.execute(
        "SELECT * FROM billing.recharge_claims WHERE org_id = %s ORDER BY id", (org,)
    ).fetchall()


def intents_created(fake_stripe):
    return fake_stripe.stats()["endpoints"].get("POST /v1/payment_intents", {}).get("created", 0)


def test_crossing_the_threshold_takes_one_claim_sized_back_to_target(service, db):
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)  # 30 min x 70 = 2100 -> balance 900
    (claim,) = claims(db, org)
    assert claim["status"] == "pending"
    assert claim["amount_minor"] == 1_000 + 2_000 - 900  # back to threshold + amount in one charge
    charge_call(service, org, 60)
    assert len(claims(db, org)) == 1


def test_fifty_concurrent_charges_make_one_claim_and_one_payment_intent(
    db_url, service, db, shim_config, fake_stripe, pool
):
    org = recharging_org(service, db, balance=4_000)

    def charge(_):
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SELECT api.deduct_call_credits(%s, %s, 60)", (org, f"call-{uuid.uuid4()}"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=25) as executor:
        list(executor.map(charge, range(50)))  # 50 x 70 = 3500: the balance crosses 1000 on the way to 500
    assert len(claims(db, org)) == 1
    run_once(pool, shim_config)
    run_once(pool, shim_config)
    assert intents_created(fake_stripe) == 1
    assert claims(db, org)[0]["status"] == "succeeded"
    (claim,) = claims(db, org)
    assert claim["amount_minor"] == 3_000 - 990  # taken at the first balance below 1000: 4000 - 43 x 70
    assert wallet(db, org)["balance_minor"] == 500 + claim["amount_minor"]
    assert ledger_count(db, org) == 1 + 50 + 1


def test_declined_card_fails_the_claim_and_waits_for_its_cooldown(
    service, db, shim_config, fake_stripe, pool
):
    org = recharging_org(service, db, card="pm_card_declines")
    fake_stripe.control("decline", {"payment_method": "pm_card_declines", "code": "card_declined"})
    charge_call(service, org, 60 * 30)
    assert process_claims(pool, make_client(shim_config))["failed"] == 1
    (claim,) = claims(db, org)
    assert claim["status"] == "failed" and claim["failure_code"] == "card_declined"

    for _ in range(3):  # more charges, more worker passes: no new claim while cooling down
        charge_call(service, org, 60)
        run_once(pool, shim_config)
    assert len(claims(db, org)) == 1
    assert intents_created(fake_stripe) == 0
    kinds = [
        n["kind"] for n in db.execute("SELECT kind FROM billing.notifications WHERE org_id = %s", (org,))
    ]
    assert kinds.count("auto_recharge_failed") == 1


def test_repeated_failures_disable_auto_recharge_and_alert(service, db, shim_config, fake_stripe, pool):
    org = recharging_org(service, db, card="pm_card_needs_3ds")
    fake_stripe.control("decline", {"payment_method": "pm_card_needs_3ds", "code": "authentication_required"})
    db.execute("UPDATE billing.settings SET recharge_cooldown = interval '0 seconds'")
    charge_call(service, org, 60 * 30)
    for _ in range(3):
        run_once(pool, shim_config)
        charge_call(service, org, 60)
    w = wallet(db, org)
    assert not w["auto_recharge_enabled"] and "authentication_required" in w["auto_recharge_disabled_reason"]
    assert [c["status"] for c in claims(db, org)] == ["failed"] * 3
    assert (
        db.execute(
            "SELECT count(*) AS n FROM billing.notifications WHERE kind = 'auto_recharge_disabled'"
        ).fetchone()["n"]
        == 1
    )


def sent_but_not_recorded(pool, shim_config):
    """The worker leased the org's claim and sent it to Stripe, then died before recording
    Stripe's answer; its lease has run out since. Returns what Stripe answered."""
    with pool.connection() as conn:
        (claim,) = conn.execute("SELECT * FROM api.lease_recharge_claims(1)").fetchall()
    answer = charge_claim(make_client(shim_config), claim)
    with pool.connection() as conn:
        conn.execute("UPDATE billing.recharge_claims SET leased_until = now() - interval '1 second'")
    return answer


def customer_intents(shim_config):
    return make_client(shim_config).v1.payment_intents.list(params={"customer": CUSTOMER, "limit": 100}).data


@pytest.mark.parametrize("stripe_forgot_the_key", [False, True], ids=["within-24h", "after-24h"])
def test_crash_after_stripe_accepted_does_not_charge_twice(
    service, db, shim_config, fake_stripe, pool, stripe_forgot_the_key
):
    """The worker charged the card, then died before recording. On restart the claim's lease
    has expired and the claim is sent again: it first finds the PaymentIntent its earlier
    attempt created (listed by customer and metadata.recharge_claim_id) and records that one,
    so one charge and one credit, even once Stripe has pruned the idempotency key (after 24
    hours a reused key creates a new PaymentIntent: G-1's remainder)."""
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    first = sent_but_not_recorded(pool, shim_config)
    if stripe_forgot_the_key:
        assert fake_stripe.control("prune_idempotency_keys")["pruned"] >= 1

    assert process_claims(pool, make_client(shim_config))["succeeded"] == 1
    assert [i.id for i in customer_intents(shim_config)] == [first["payment_intent_id"]]
    assert intents_created(fake_stripe) == 1
    (claim,) = claims(db, org)
    assert (claim["status"], claim["payment_intent_id"]) == ("succeeded", first["payment_intent_id"])
    assert ledger_count(db, org) == 3  # seed credit, the call, one recharge


def test_a_claim_resent_after_the_customer_changed_finds_its_first_payment_intent(
    service, db, shim_config, fake_stripe, pool
):
    """Issue 13, item 2: Stripe's answer is lost, then the wallet's Stripe customer is changed and
    Stripe prunes the claim's idempotency key. The retry looked for the earlier PaymentIntent under
    the *current* customer only, found none, and charged a second card for the same claim. Every
    customer a claim was sent under is searched now."""
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    first = sent_but_not_recorded(pool, shim_config)
    service.execute("SELECT * FROM api.set_payment_method(%s, 'cus_ReplacedLater02', %s)", (org, CARD))
    fake_stripe.control("prune_idempotency_keys")

    assert process_claims(pool, make_client(shim_config))["succeeded"] == 1
    assert intents_created(fake_stripe) == 1
    (claim,) = claims(db, org)
    assert claim["payment_intent_id"] == first["payment_intent_id"]
    assert claim["sent_to_customers"] == [CUSTOMER, "cus_ReplacedLater02"]
    assert ledger_count(db, org) == 3  # seed credit, the call, one recharge


def test_unrecorded_decline_found_on_retry_fails_the_claim_without_charging_again(
    service, db, shim_config, fake_stripe, pool
):
    """The card declined, the worker died before recording it, and a day later Stripe has
    forgotten the key: the retry finds the declined PaymentIntent and fails the claim with the
    decline's own code (and its cooldown) instead of confirming the card again."""
    org = recharging_org(service, db)
    fake_stripe.control("decline", {"payment_method": CARD, "code": "card_declined"})
    charge_call(service, org, 60 * 30)
    first = sent_but_not_recorded(pool, shim_config)
    assert first["outcome"] == "failed"
    fake_stripe.control("prune_idempotency_keys")

    assert process_claims(pool, make_client(shim_config))["failed"] == 1
    assert [i.id for i in customer_intents(shim_config)] == [first["payment_intent_id"]]
    (claim,) = claims(db, org)
    assert (claim["status"], claim["failure_code"]) == ("failed", "card_declined")
    assert claim["cooldown_until"] is not None
    assert ledger_count(db, org) == 2  # seed credit and the call: nothing credited


def test_webhook_and_worker_both_report_the_success_credit_once(
    service, db, shim_config, stripe_delivers, pool
):
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    process_claims(pool, make_client(shim_config))  # the fake delivers payment_intent.succeeded too
    event = db.execute(
        "SELECT * FROM billing.webhook_events WHERE event_type = 'payment_intent.succeeded'"
    ).fetchone()
    assert event["status"] == "processed"
    assert {event["result"]["result"]["status"]} <= {"applied", "duplicate"}
    recharges = db.execute("SELECT * FROM billing.ledger_entries WHERE kind = 'auto_recharge'").fetchall()
    assert len(recharges) == 1
    assert wallet(db, org)["balance_minor"] == 900 + claims(db, org)[0]["amount_minor"]


def test_stripe_outage_defers_the_claim_without_failing_it(service, db, shim_config, fake_stripe, pool):
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    fake_stripe.control("fail", {"count": 10, "status": 500})
    config = dataclasses.replace(shim_config)
    counts = process_claims(pool, make_client(config, max_network_retries=0))
    assert counts["deferred"] == 1
    assert claims(db, org)[0]["status"] == "pending"


def test_switching_auto_recharge_off_withdraws_the_unsent_claim(service, db, shim_config, fake_stripe, pool):
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    with as_user(db, org, "admin", commit=True) as conn:
        conn.execute("SELECT * FROM api.configure_auto_recharge(false, 1000::bigint, 2000::bigint)")
    (claim,) = claims(db, org)
    assert claim["status"] == "failed" and claim["failure_code"] == "canceled_by_customer"
    assert claim["cooldown_until"] is None  # withdrawn, not declined: no cooldown
    run_once(pool, shim_config)
    assert intents_created(fake_stripe) == 0
    assert wallet(db, org)["auto_recharge_failures"] == 0


def test_revoked_stripe_key_fails_the_recharge_job_but_not_the_pass(
    service, db, shim_config, fake_stripe, pool, monkeypatch
):
    """One job's failure is reported and the others still run (holds, webhooks, reconciliation)."""
    import stripe

    import shim.worker as worker

    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)

    def revoked(*_):
        raise stripe.AuthenticationError("Invalid API Key provided: sk_test_****")

    monkeypatch.setattr(worker, "process_claims", revoked)
    db.execute("UPDATE billing.holds SET expires_at = now() - interval '1 second'")
    report = run_once(pool, shim_config)
    assert report["recharges"].startswith("error: AuthenticationError")
    assert isinstance(report["webhooks_retried"], dict) and "reconciliation" in report


def test_customer_switching_off_during_a_deferred_attempt_withdraws_it_at_next_lease(
    service, db, shim_config, fake_stripe, pool
):
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    fake_stripe.control("fail", {"count": 10, "status": 500})
    assert process_claims(pool, make_client(shim_config, max_network_retries=0))["deferred"] == 1
    with as_user(db, org, "owner", commit=True) as conn:  # the claim is leased: not withdrawn here
        conn.execute("SELECT * FROM api.configure_auto_recharge(false, 1000::bigint, 2000::bigint)")
    assert claims(db, org)[0]["status"] == "pending"
    db.execute("UPDATE billing.recharge_claims SET leased_until = now() - interval '1 second'")
    assert process_claims(pool, make_client(shim_config))["leased"] == 0
    (claim,) = claims(db, org)
    assert claim["status"] == "failed" and claim["failure_code"] == "canceled_by_customer"
    assert intents_created(fake_stripe) == 0
    recharge_failures = service.execute(
        "SELECT value FROM api.health_metrics() WHERE metric = 'recharge_failures_24h'"
    ).fetchone()["value"]
    assert recharge_failures == 0  # withdrawn by the customer is not a failure


def test_a_silent_stripe_is_given_up_within_the_timeout_and_the_claim_waits(
    service, db, shim_config, pool, monkeypatch
):
    """Issue 13, item 3: stripe-python's default 80 s per request held the worker's whole pass.
    A Stripe that accepts the connection and never answers is given up after the client's
    timeout (shortened here), every retry included, and the claim is left for its next lease."""
    import socket
    import time

    from shim import stripe_client

    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    monkeypatch.setattr(stripe_client, "STRIPE_TIMEOUT_SECONDS", (0.5, 0.5))
    silent = dataclasses.replace(shim_config, stripe_api_base=f"http://127.0.0.1:{listener.getsockname()[1]}")
    org = recharging_org(service, db)
    charge_call(service, org, 60 * 30)
    started = time.monotonic()
    report = process_claims(pool, make_client(silent, max_network_retries=1))
    elapsed = time.monotonic() - started
    listener.close()
    assert elapsed < 10  # two tries of 0.5 s and the client's backoff; 80 s each before
    assert report["deferred"] == 1, report
    (claim,) = claims(db, org)
    assert (claim["status"], claim["payment_intent_id"]) == ("pending", None)
