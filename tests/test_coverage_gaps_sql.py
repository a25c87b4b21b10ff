"""The PL/pgSQL paths the rest of the suite never reached (found with plpgsql_check's profiler,
tests/plpgsql_coverage.py), each tested for what it does, not merely run.

Three groups:
- refused input: every validation branch of a service or client function raises SQLSTATE 22023
  (or 42501 / P0002 where that is the contract), names the field in diag.column_name, and changes
  nothing;
- rare provider events, applied through api.ingest_webhook exactly as the shim hands them over:
  refunds that fail, events that belong to nobody, messages without a call, statuses nobody acts on;
- operator and worker paths: reconciliation of a mismatching or unfinished object, recording a
  checkout session twice, releasing another org's call.

Three bugs were found this way and fixed (each test below is their regression test): a refund
that failed before it was created no longer debits, an inquiry dispute withdraws nothing, and an
unknown recharge claim is reported under the parameter's own name, claim_id.
"""

import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shim.fakes import payloads
from tests.db_helpers import (
    as_user,
    hold_row,
    ledger_count,
    notifications,
    open_wallet,
    route_assistant,
    snapshot,
    wallet,
)

NOW = datetime.now(UTC)
ACCOUNT = "AC" + "0" * 32
CUSTOMER, CARD = "cus_CoverageGaps01", "pm_card_visa_gaps"


# ---------------------------------------------------------------------------- helpers


def ingest(conn, provider, event_type, payload, event_id=None):
    """Hand one verified event to api.ingest_webhook, as the shim does; return its answer."""
    return conn.execute(
        "SELECT api.ingest_webhook(%s, %s, %s, %s) AS a",
        (provider, event_id or f"evt-{uuid.uuid4()}", event_type, Jsonb(payload)),
    ).fetchone()["a"]


def stripe(conn, event_type, obj, event_id=None):
    """A Stripe event envelope around obj, ingested; returns the inbox answer."""
    event = payloads.stripe_event(
        event_id=event_id or payloads.stripe_id("evt"), event_type=event_type, data_object=obj
    )
    return ingest(conn, "stripe", event_type, event, event["id"])


def vapi(conn, message):
    """A Vapi server message ({"message": {...}}), ingested under its type."""
    return ingest(conn, "vapi", message["message"]["type"], message)


def twilio(conn, params):
    """A Twilio status callback's form fields, ingested."""
    return ingest(conn, "twilio", "message.status", params)


def sms_callback(sid, status):
    return payloads.twilio_status_callback(
        message_sid=sid, status=status, account_sid=ACCOUNT, from_="+15550000001", to="+15550000002"
    )


def event_row(db, row_id):
    return db.execute("SELECT * FROM billing.webhook_events WHERE id = %s", (row_id,)).fetchone()


def entries(db, org):
    """(kind, amount) of an org's ledger, oldest first."""
    rows = db.execute(
        "SELECT kind, amount_minor FROM billing.ledger_entries WHERE org_id = %s ORDER BY id", (org,)
    ).fetchall()
    return [(r["kind"], r["amount_minor"]) for r in rows]


def credited_payment(service, amount=5000, org=None):
    """An org whose Stripe Checkout payment was credited; returns (org, payment_intent_id)."""
    org = org or open_wallet(service)
    pi = payloads.stripe_id("pi")
    session = payloads.stripe_checkout_session(
        session_id=payloads.checkout_session_id(), org_id=str(org), amount_total=amount, payment_intent=pi
    )
    answer = stripe(service, "checkout.session.completed", session)
    assert answer["result"]["status"] == "applied"
    return org, pi


def refund(pi, amount, status="succeeded", refund_id=None):
    return payloads.stripe_refund(
        refund_id=refund_id or payloads.stripe_id("re"),
        payment_intent=pi,
        charge=payloads.stripe_id("ch"),
        amount=amount,
        status=status,
    )


def state(db) -> dict:
    """snapshot() plus every other table a refused call might have written."""
    snap = snapshot(db)
    for table in (
        "checkout_requests",
        "reconciliation_runs",
        "discrepancies",
        "notifications",
        "vapi_routes",
    ):
        snap[table] = db.execute(f"SELECT * FROM billing.{table} ORDER BY 1").fetchall()
    return snap


def value(conn, sql, params=()):
    """The first column of a statement's single row."""
    row = conn.execute(sql, params).fetchone()
    return next(iter(row.values()))


def start_run(conn, provider):
    """A reconciliation run over the last day; its id."""
    return value(
        conn, "SELECT api.start_reconciliation_run(%s, now() - interval '1 day', now())", (provider,)
    )["run_id"]


def begin_checkout(db, org, amount=2500):
    """begin_checkout as the org's owner (committed); its answer."""
    with as_user(db, org, "owner", commit=True) as conn:
        return value(conn, "SELECT api.begin_checkout(%s::bigint, %s)", (amount, uuid.uuid4()))


def record_session(conn, request_id, session_id, url):
    return value(conn, "SELECT api.record_checkout_session(%s, %s, %s)", (request_id, session_id, url))


def refused(conn, sql, params=()):
    """Run a statement that must fail; return the error."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as exc:
        return exc
    raise AssertionError(f"expected an error from: {sql}")


# ---------------------------------------------------------------------------- refused input


@pytest.fixture
def world(service, db):
    """One of everything a refused call could name: a funded org with a card and a pending
    recharge claim, a processed webhook event, an open checkout request, a reconciliation run
    with a resolved discrepancy."""
    org = open_wallet(service, balance_minor=3_000)
    service.execute("SELECT * FROM api.set_payment_method(%s, %s, %s)", (org, CUSTOMER, CARD))
    with as_user(db, org, "owner", commit=True) as conn:
        conn.execute("SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2000::bigint)")
    service.execute("SELECT * FROM api.deduct_call_credits(%s, 'call-world', 1800)", (org,))  # 3000 - 2100
    claim = db.execute(
        "SELECT id FROM billing.recharge_claims WHERE org_id = %s AND status = 'pending'", (org,)
    ).fetchone()["id"]

    _, pi = credited_payment(service, 2500, org=org)
    event = db.execute("SELECT id FROM billing.webhook_events WHERE status = 'processed'").fetchone()["id"]

    answer = begin_checkout(db, org)
    assert answer["status"] == "create"
    record_session(service, answer["request_id"], "cs_test_world", "https://checkout.test/w")

    run = start_run(service, "stripe")
    assert service.execute("SELECT api.record_stripe_phantoms(%s, '{}') AS n", (run,)).fetchone()["n"] == 1
    discrepancy = db.execute("SELECT id FROM billing.discrepancies").fetchone()["id"]
    service.execute("SELECT api.resolve_discrepancy(%s, 'checked by hand')", (discrepancy,))
    return {
        "org": org,
        "claim": claim,
        "event": event,
        "request": answer["request_id"],
        "run": run,
        "discrepancy": discrepancy,
        "pi": pi,
        "nobody": uuid.uuid4(),
        "missing": 987_654_321,
    }


# (id, statement with %(name)s placeholders from `world`, the field diag.column_name must name)
REFUSALS = [
    ("adjust-null-org", "SELECT api.adjust_wallet(NULL, 100::bigint, 'adj-1', 'ticket 7')", "org_id"),
    (
        "adjust-details-not-object",
        "SELECT api.adjust_wallet(%(org)s, 100::bigint, 'adj-1', 'ticket 7', '[1]'::jsonb)",
        "details",
    ),
    ("discard-reason-too-short", "SELECT api.discard_webhook_event(%(event)s, 'no')", "reason"),
    ("replay-processed-event", "SELECT api.replay_webhook_event(%(event)s)", "event_row_id"),
    ("replay-unknown-event", "SELECT api.replay_webhook_event(%(missing)s)", "event_row_id"),
    ("ingest-unknown-provider", "SELECT api.ingest_webhook('paypal', 'evt_1', 'payment', '{}')", "provider"),
    ("ingest-payload-array", "SELECT api.ingest_webhook('stripe', 'evt_1', 'x', '[1, 2]')", "payload"),
    ("ingest-payload-null", "SELECT api.ingest_webhook('vapi', 'evt_1', 'x', NULL)", "payload"),
    ("retry-zero-events", "SELECT api.retry_webhook_events(0)", "max_events"),
    ("retry-too-many-events", "SELECT api.retry_webhook_events(10001)", "max_events"),
    ("lease-zero-claims", "SELECT * FROM api.lease_recharge_claims(0)", "max_claims"),
    ("lease-null-claims", "SELECT * FROM api.lease_recharge_claims(NULL)", "max_claims"),
    ("notifications-zero-rows", "SELECT * FROM api.pending_notifications(0)", "max_rows"),
    ("notifications-too-many-rows", "SELECT * FROM api.pending_notifications(1001)", "max_rows"),
    ("recharge-result-null-claim", "SELECT api.record_recharge_result(NULL, 'failed')", "claim_id"),
    ("recharge-result-unknown-outcome", "SELECT api.record_recharge_result(%(claim)s, 'maybe')", "outcome"),
    ("recharge-result-null-outcome", "SELECT api.record_recharge_result(%(claim)s, NULL)", "outcome"),
    (
        "recharge-result-success-without-intent",
        "SELECT api.record_recharge_result(%(claim)s, 'succeeded', NULL, 2000::bigint)",
        "payment_intent_id",
    ),
    (
        "recharge-processing-unknown-claim",
        "SELECT api.mark_recharge_processing(%(missing)s, 'pi_processing_1')",
        "claim_id",
    ),
    (
        "checkout-session-empty-url",
        "SELECT api.record_checkout_session(%(request)s, 'cs_test_x', '')",
        "checkout_url",
    ),
    (
        "checkout-session-unknown-request",
        "SELECT api.record_checkout_session(%(missing)s, 'cs_test_x', 'https://checkout.test/x')",
        "request_id",
    ),
    (
        "run-unknown-provider",
        "SELECT api.start_reconciliation_run('paypal', now() - interval '1 hour', now())",
        "provider",
    ),
    (
        "run-window-backwards",
        "SELECT api.start_reconciliation_run('vapi', now(), now() - interval '1 hour')",
        "window_end",
    ),
    ("run-window-open", "SELECT api.start_reconciliation_run('vapi', now(), NULL)", "window_end"),
    ("finish-unknown-status", "SELECT api.finish_reconciliation_run(%(run)s, 'done')", "status"),
    ("finish-unknown-run", "SELECT api.finish_reconciliation_run(%(missing)s, 'completed')", "run_id"),
    ("phantoms-unknown-run", "SELECT api.record_stripe_phantoms(%(missing)s, '{}')", "run_id"),
    (
        "reconcile-event-without-type",
        'SELECT api.reconcile_stripe_event(%(run)s, \'{"id": "evt_no_type", "data": {}}\')',
        "event",
    ),
    ("reconcile-event-null", "SELECT api.reconcile_stripe_event(%(run)s, NULL)", "event"),
    (
        "reconcile-object-unknown-provider",
        "SELECT api.reconcile_object(%(run)s, 'paypal', 'x', '{}')",
        "provider",
    ),
    ("reconcile-object-empty-ref", "SELECT api.reconcile_object(%(run)s, 'vapi', '', '{}')", "ref"),
    ("reconcile-object-null", "SELECT api.reconcile_object(%(run)s, 'vapi', 'call-1', NULL)", "object"),
    ("ingest-text-null-body", "SELECT api.ingest_webhook_text('stripe', 'evt_1', 'x', NULL)", "body"),
    ("ingest-text-empty-event-id", "SELECT api.ingest_webhook_text('vapi', '', 'x', '{}')", "event_id"),
    ("reconcile-call-without-id", 'SELECT api.reconcile_vapi_call(%(run)s, \'{"status": "ended"}\')', "call"),
    ("resolve-too-short", "SELECT api.resolve_discrepancy(%(discrepancy)s, 'ok')", "resolution"),
    (
        "resolve-already-resolved",
        "SELECT api.resolve_discrepancy(%(discrepancy)s, 'checked again')",
        "discrepancy_id",
    ),
    ("pricing-no-wallet", "SELECT api.set_pricing(%(nobody)s, 70::bigint, 1, 1::bigint)", "org_id"),
    ("payment-method-no-wallet", "SELECT api.set_payment_method(%(nobody)s, 'cus_x', 'pm_x')", "org_id"),
    ("route-unknown-kind", "SELECT api.set_vapi_route('squad', 'sq_1', %(org)s)", "kind"),
    ("route-org-without-wallet", "SELECT api.set_vapi_route('assistant', 'asst_1', %(nobody)s)", "org_id"),
    ("route-null-org", "SELECT api.set_vapi_route('phone_number', 'pn_1', NULL)", "org_id"),
]


@pytest.mark.parametrize(
    ("sql", "field"), [pytest.param(sql, field, id=name) for name, sql, field in REFUSALS]
)
def test_invalid_input_is_22023_naming_the_field_and_changes_nothing(service, db, world, sql, field):
    before = state(db)
    exc = refused(service, sql, world)
    assert isinstance(exc, psycopg.errors.InvalidParameterValue), exc
    assert exc.sqlstate == "22023"
    assert exc.diag.column_name == field
    assert f"invalid {field}:" in exc.diag.message_primary
    assert state(db) == before


def test_recharge_result_for_an_unknown_claim_is_refused_either_way(service, db, world):
    """Neither a success nor a failure can be recorded against a claim that does not exist."""
    before = state(db)
    for sql in (
        "SELECT api.record_recharge_result(%(missing)s, 'succeeded', 'pi_unknown', 2000::bigint, 'usd')",
        "SELECT api.record_recharge_result(%(missing)s, 'failed', NULL, NULL, NULL, 'card_declined')",
    ):
        exc = refused(service, sql, world)
        assert exc.sqlstate == "22023"
        assert str(world["missing"]) in exc.diag.message_primary
    assert state(db) == before


def test_recharge_result_for_an_unknown_claim_names_the_claim_id_parameter(service, world):
    exc = refused(service, "SELECT api.record_recharge_result(%(missing)s, 'failed')", world)
    assert exc.diag.column_name == "claim_id"


def test_marking_a_settled_claim_as_processing_changes_nothing(service, db, world):
    """The claim's webhook overtook the worker: marking it processing afterwards is a no-op that
    says how the claim ended (never a PaymentIntent id on a claim that already failed)."""
    service.execute(
        "SELECT api.record_recharge_result(%s, 'failed', NULL, NULL, NULL, 'card_declined')",
        (world["claim"],),
    )
    before = state(db)
    answer = value(service, "SELECT api.mark_recharge_processing(%s, 'pi_late')", (world["claim"],))
    assert answer == {"claim_id": world["claim"], "status": "failed", "payment_intent_id": None}
    assert state(db) == before


# ---------------------------------------------------------------------------- client functions


def test_begin_checkout_needs_a_member_role(db, service):
    org = open_wallet(service)
    before = state(db)
    with (
        pytest.raises(psycopg.errors.InsufficientPrivilege) as raised,
        as_user(db, org, org_role="viewer") as conn,
    ):
        conn.execute("SELECT api.begin_checkout(2500::bigint, %s)", (uuid.uuid4(),))
    assert "not a member" in raised.value.diag.message_primary
    assert state(db) == before


def test_begin_checkout_needs_a_client_request_id(db, service):
    org = open_wallet(service)
    before = state(db)
    with (
        pytest.raises(psycopg.errors.InvalidParameterValue) as raised,
        as_user(db, org, org_role="member") as conn,
    ):
        conn.execute("SELECT api.begin_checkout(2500::bigint, NULL)")
    assert raised.value.diag.column_name == "client_request_id"
    assert state(db) == before


def test_begin_checkout_for_an_org_without_a_wallet_is_p0002(db, service):
    open_wallet(service)  # somebody else's
    before = state(db)
    with (
        pytest.raises(psycopg.errors.NoDataFound) as raised,
        as_user(db, uuid.uuid4(), org_role="owner") as conn,
    ):
        conn.execute("SELECT api.begin_checkout(2500::bigint, %s)", (uuid.uuid4(),))
    assert "no wallet" in raised.value.diag.message_primary
    assert state(db) == before


def test_configure_auto_recharge_for_an_org_without_a_wallet_is_p0002(db, service):
    before = state(db)
    with (
        pytest.raises(psycopg.errors.NoDataFound) as raised,
        as_user(db, uuid.uuid4(), org_role="admin") as conn,
    ):
        conn.execute("SELECT * FROM api.configure_auto_recharge(true, 1000::bigint, 2000::bigint)")
    assert "no wallet" in raised.value.diag.message_primary
    assert state(db) == before


# ---------------------------------------------------------------------------- checkout recording


def test_recording_a_second_session_keeps_the_first(db, service):
    """A late lease holder recording another session gets the request's existing session back;
    the row keeps the session that was recorded first."""
    org = open_wallet(service)
    answer = begin_checkout(db, org)
    first = record_session(service, answer["request_id"], "cs_test_first", "https://checkout.test/1")
    assert first["status"] == "existing" and first["session_id"] == "cs_test_first"
    row_before = db.execute("SELECT * FROM billing.checkout_requests").fetchone()

    late = record_session(service, answer["request_id"], "cs_test_second", "https://checkout.test/2")
    assert late["status"] == "existing"
    assert (late["session_id"], late["checkout_url"]) == ("cs_test_first", "https://checkout.test/1")
    assert db.execute("SELECT * FROM billing.checkout_requests").fetchone() == row_before


# ---------------------------------------------------------------------------- Stripe refunds and disputes


def test_refund_that_fails_after_its_debit_is_credited_back_once(service, db):
    org, pi = credited_payment(service, 5000)
    debited = refund(pi, 2000)
    assert stripe(service, "refund.created", debited)["result"]["status"] == "applied"
    assert wallet(db, org)["balance_minor"] == 3000

    failed = dict(debited, status="failed", failure_reason="expired_or_canceled_card")
    answer = stripe(service, "refund.failed", failed)
    assert answer["status"] == "processed" and answer["org_id"] == str(org)
    assert answer["result"]["status"] == "applied" and answer["result"]["amount_minor"] == 2000
    assert wallet(db, org)["balance_minor"] == 5000

    # refund.updated says the same; a canceled status for the same refund is the same reversal.
    again = stripe(service, "refund.updated", dict(debited, status="canceled"))
    assert again["result"]["status"] == "duplicate"
    assert entries(db, org) == [("top_up", 5000), ("refund", -2000), ("refund_reversal", 2000)]
    reversal = db.execute("SELECT * FROM billing.ledger_entries WHERE kind = 'refund_reversal'").fetchone()
    assert reversal["provider_ref"] == f"stripe:refund:{debited['id']}:reversed"


def test_refund_that_fails_before_it_was_debited_moves_nothing(service, db):
    org, pi = credited_payment(service, 5000)
    before = snapshot(db)
    answer = stripe(service, "refund.failed", refund(pi, 2000, status="failed"))
    assert answer["status"] == "ignored" and answer["note"] == "refund_failed_before_debit"
    after = snapshot(db)
    assert after["ledger_entries"] == before["ledger_entries"] and after["wallets"] == before["wallets"]
    assert wallet(db, org)["balance_minor"] == 5000


def test_refund_failed_delivered_before_refund_created_nets_to_zero(service, db):
    org, pi = credited_payment(service, 5000)
    created = refund(pi, 2000, status="pending")
    stripe(service, "refund.failed", dict(created, status="failed"))
    stripe(service, "refund.created", created)  # Stripe does not guarantee event order
    assert wallet(db, org)["balance_minor"] == 5000


def test_refund_without_a_payment_intent_is_ignored(service, db):
    org, _ = credited_payment(service, 5000)
    before = snapshot(db)
    answer = stripe(service, "refund.created", refund(None, 1000))
    assert answer["status"] == "ignored" and answer["note"] == "refund_without_payment_intent"
    row = db.execute("SELECT * FROM billing.webhook_events WHERE event_type = 'refund.created'").fetchone()
    assert row["status"] == "ignored" and row["next_attempt_at"] is None
    after = snapshot(db)
    assert after["ledger_entries"] == before["ledger_entries"] and after["wallets"] == before["wallets"]


def test_zero_amount_refund_is_ignored_for_its_org(service, db):
    org, pi = credited_payment(service, 5000)
    answer = stripe(service, "refund.created", refund(pi, 0))
    assert answer["status"] == "ignored" and answer["note"] == "zero_amount"
    assert answer["org_id"] == str(org)
    assert entries(db, org) == [("top_up", 5000)]


def test_charge_refunded_without_its_refund_list_waits_for_the_refund_events(service, db):
    """Recent API versions do not expand charge.refunds: the refund.* events carry the debit."""
    org, pi = credited_payment(service, 5000)
    charge = payloads.stripe_charge(
        charge_id=payloads.stripe_id("ch"), payment_intent=pi, amount=5000, amount_refunded=1500
    )
    del charge["refunds"]
    answer = stripe(service, "charge.refunded", charge)
    assert answer["status"] == "ignored" and answer["note"] == "refunds_not_listed"
    assert wallet(db, org)["balance_minor"] == 5000  # never from the cumulative amount_refunded
    assert stripe(service, "refund.created", refund(pi, 1500))["result"]["status"] == "applied"
    assert entries(db, org) == [("top_up", 5000), ("refund", -1500)]


def test_dispute_reinstated_before_it_was_withdrawn_waits_for_the_withdrawal(service, db):
    org, pi = credited_payment(service, 5000)
    dispute = payloads.stripe_dispute(
        dispute_id=payloads.stripe_id("dp"),
        payment_intent=pi,
        charge=payloads.stripe_id("ch"),
        amount=5000,
        status="won",
    )
    early = stripe(service, "charge.dispute.funds_reinstated", dispute)
    assert early["status"] == "failed"
    assert early["error"].startswith("P0002") and dispute["id"] in early["error"]
    row = event_row(db, early["event_row_id"])
    assert row["status"] == "failed" and row["next_attempt_at"] is not None
    assert entries(db, org) == [("top_up", 5000)]

    stripe(service, "charge.dispute.funds_withdrawn", dict(dispute, status="needs_response"))
    assert wallet(db, org)["balance_minor"] == 0
    db.execute(
        "UPDATE billing.webhook_events SET next_attempt_at = now() WHERE id = %s", (early["event_row_id"],)
    )
    assert value(service, "SELECT api.retry_webhook_events(10)") == {"processed": 1}
    assert wallet(db, org)["balance_minor"] == 5000
    assert entries(db, org) == [("top_up", 5000), ("dispute", -5000), ("dispute_reversal", 5000)]


def test_dispute_inquiry_that_closes_moves_no_money(service, db):
    org, pi = credited_payment(service, 5000)
    inquiry = payloads.stripe_dispute(
        dispute_id=payloads.stripe_id("dp"),
        payment_intent=pi,
        charge=payloads.stripe_id("ch"),
        amount=5000,
        status="warning_needs_response",
    )
    stripe(service, "charge.dispute.created", inquiry)
    stripe(service, "charge.dispute.closed", dict(inquiry, status="warning_closed"))
    assert wallet(db, org)["balance_minor"] == 5000


# ---------------------------------------------------------------------------- Stripe payments


def test_payment_intent_without_an_org_is_not_ours(service, db):
    open_wallet(service)
    before = snapshot(db)
    intent = payloads.stripe_payment_intent(
        pi_id=payloads.stripe_id("pi"), org_id=None, amount=4000, metadata={"order": "shop-123"}
    )
    answer = stripe(service, "payment_intent.succeeded", intent)
    assert answer["status"] == "ignored" and answer["note"] == "not_a_creditledger_payment"
    after = snapshot(db)
    assert after["ledger_entries"] == before["ledger_entries"] and after["wallets"] == before["wallets"]


def test_failed_payment_that_is_not_a_recharge_is_ignored(service, db):
    org = open_wallet(service)
    intent = payloads.stripe_payment_intent(
        pi_id=payloads.stripe_id("pi"),
        org_id=str(org),
        amount=4000,
        status="requires_payment_method",
        last_payment_error={"code": "card_declined", "decline_code": "insufficient_funds"},
    )
    answer = stripe(service, "payment_intent.payment_failed", intent)
    assert answer["status"] == "ignored" and answer["note"] == "not_a_recharge"
    assert ledger_count(db, org) == 0
    assert db.execute("SELECT count(*) AS n FROM billing.notifications").fetchone()["n"] == 0
    assert db.execute("SELECT count(*) AS n FROM billing.recharge_claims").fetchone()["n"] == 0


def test_recharge_success_for_an_unknown_claim_is_kept_for_the_worker(service, db):
    """A recharge PaymentIntent naming a claim this ledger never took is not credited to the org
    on a guess: the event fails (22023 from the claim lookup) and stays in the retry queue."""
    org = open_wallet(service)
    intent = payloads.stripe_payment_intent(
        pi_id=payloads.stripe_id("pi"),
        org_id=str(org),
        amount=2000,
        metadata={"org_id": str(org), "recharge_claim_id": "424242"},
    )
    answer = stripe(service, "payment_intent.succeeded", intent)
    assert answer["status"] == "failed" and answer["error"].startswith("22023")
    assert "no claim 424242" in answer["error"]
    assert event_row(db, answer["event_row_id"])["next_attempt_at"] is not None
    assert ledger_count(db, org) == 0


# ---------------------------------------------------------------------------- Vapi messages


def test_vapi_message_without_a_call_is_ignored(service, db):
    before = snapshot(db)
    answer = vapi(service, {"message": {"type": "end-of-call-report", "endedReason": "pipeline-error"}})
    assert answer["status"] == "ignored" and answer["note"] == "no_call"
    after = snapshot(db)
    assert after["ledger_entries"] == before["ledger_entries"] and after["holds"] == before["holds"]


def test_in_progress_call_nobody_owns_is_unattributed_and_holds_nothing(service, db):
    open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(status="in-progress", started_at=NOW, assistant_id="asst-nobody-routes")
    answer = vapi(service, payloads.vapi_status_update(call, "in-progress"))
    assert answer["status"] == "unattributed" and answer["note"] == "no_org_for_call"
    assert event_row(db, answer["event_row_id"])["status"] == "unattributed"
    assert hold_row(db, call["id"]) is None


@pytest.mark.parametrize("status", ["ringing", "ended", "forwarding"])
def test_status_updates_other_than_in_progress_change_no_hold(service, db, status):
    org = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, org), status="in-progress", started_at=NOW
    )
    assert vapi(service, payloads.vapi_status_update(call, "in-progress"))["result"]["status"] == "applied"
    held = wallet(db, org)["held_minor"]
    answer = vapi(service, payloads.vapi_status_update(call, status))
    assert answer["status"] == "ignored" and answer["note"] == f"status_{status}"
    assert hold_row(db, call["id"])["status"] == "open"
    assert wallet(db, org)["held_minor"] == held and ledger_count(db, org) == 1


def test_status_update_without_a_status_is_ignored(service, db):
    org = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(assistant_id=route_assistant(service, org), status="queued")
    answer = vapi(service, {"message": {"type": "status-update", "call": call}})
    assert answer["status"] == "ignored" and answer["note"] == "status_none"
    assert hold_row(db, call["id"]) is None


def test_other_vapi_message_types_are_stored_as_unhandled(service, db):
    org = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, org), status="in-progress", started_at=NOW
    )
    before = snapshot(db)
    answer = vapi(
        service, {"message": {"type": "transcript", "role": "user", "transcript": "hello", "call": call}}
    )
    assert answer["status"] == "ignored" and answer["note"] == "unhandled_type"
    after = snapshot(db)
    assert after["ledger_entries"] == before["ledger_entries"] and after["holds"] == before["holds"]


# ---------------------------------------------------------------------------- Twilio callbacks


@pytest.fixture
def sms(service):
    org = open_wallet(service, balance_minor=100, sms_segment_minor=2)
    sid = payloads.twilio_sid("SM")
    registered = service.execute("SELECT * FROM api.register_sms(%s, %s, 3)", (org, sid)).fetchone()
    assert registered["status"] == "applied"
    return org, sid


def test_callback_without_a_status_is_ignored(service, db, sms):
    _, sid = sms
    before = snapshot(db)
    answer = twilio(service, {"MessageSid": sid, "AccountSid": ACCOUNT})
    assert answer["status"] == "ignored" and answer["note"] == "no_message_status"
    after = snapshot(db)
    assert after["holds"] == before["holds"] and after["wallets"] == before["wallets"]


def test_unknown_sms_status_is_ignored_and_keeps_the_hold(service, db, sms):
    org, sid = sms
    # Not in twilio-python's MessageInstance.Status (every status there has a rule:
    # tests/test_sms_status_rules.py): one Twilio might add before this ledger knows it.
    answer = twilio(service, sms_callback(sid, "not_a_twilio_status"))
    assert answer["status"] == "ignored" and answer["org_id"] == str(org)
    assert answer["result"]["status"] == "rejected" and answer["result"]["reason"] == "unknown_status"
    hold = hold_row(db, sid, "sms")
    assert hold["status"] == "open" and hold["provider_status"] is None
    assert wallet(db, org)["held_minor"] == 6 and wallet(db, org)["balance_minor"] == 100


def test_queued_status_is_recorded_and_charges_nothing_yet(service, db, sms):
    org, sid = sms
    answer = twilio(service, sms_callback(sid, "queued"))
    assert answer["status"] == "processed" and answer["result"]["status"] == "applied"
    assert answer["result"]["entry_id"] is None and answer["result"]["balance_minor"] == 100
    hold = hold_row(db, sid, "sms")
    assert hold["status"] == "open" and hold["provider_status"] == "queued"
    assert ledger_count(db, org) == 1  # the seed credit only
    assert twilio(service, sms_callback(sid, "sending"))["result"]["reason"] == "stale_status"  # same rank
    assert twilio(service, sms_callback(sid, "sent"))["result"]["amount_minor"] == -6
    assert wallet(db, org)["balance_minor"] == 94 and wallet(db, org)["held_minor"] == 0


# ---------------------------------------------------------------------------- calls without a wallet


def test_releasing_a_call_of_an_org_without_a_wallet_is_rejected_unknown_org(service, db):
    """Releasing is answered like every other call function for an org that has no wallet: rejected,
    unknown_org, and the hold of the same call id in a real org is left alone."""
    owner = open_wallet(service, balance_minor=10_000)
    service.execute("SELECT * FROM api.authorize_call(%s, 'call-shared', 10)", (owner,))
    before = snapshot(db)
    answer = service.execute("SELECT * FROM api.release_call(%s, 'call-shared')", (uuid.uuid4(),)).fetchone()
    assert answer == {
        "status": "rejected",
        "entry_id": None,
        "amount_minor": None,
        "balance_minor": None,
        "reason": "unknown_org",
    }
    assert snapshot(db) == before
    assert hold_row(db, "call-shared")["status"] == "open"


# ---------------------------------------------------------------------------- reconciliation


def run_row(db, run_id):
    return db.execute("SELECT * FROM billing.reconciliation_runs WHERE id = %s", (run_id,)).fetchone()


def test_reconciled_event_for_another_amount_is_a_mismatch_not_a_credit(service, db):
    """Stripe's record of a payment the ledger credited at another amount: nothing is applied and
    an amount_mismatch discrepancy names the payment, Stripe's amount and the ledger entry."""
    org, pi = credited_payment(service, 2500)
    credit = db.execute("SELECT id FROM billing.ledger_entries WHERE org_id = %s", (org,)).fetchone()["id"]
    run = start_run(service, "stripe")
    intent = payloads.stripe_payment_intent(pi_id=pi, org_id=str(org), amount=3000)
    event = payloads.stripe_event(
        event_id=payloads.stripe_id("evt"), event_type="payment_intent.succeeded", data_object=intent
    )
    answer = value(service, "SELECT api.reconcile_stripe_event(%s, %s)", (run, Jsonb(event)))
    assert answer["outcome"] == "mismatch"
    assert answer["answer"]["result"]["status"] == "conflict"
    assert entries(db, org) == [("top_up", 2500)]

    (found,) = db.execute("SELECT * FROM billing.discrepancies").fetchall()
    assert (found["kind"], found["provider"], found["ref"]) == ("amount_mismatch", "stripe", pi)
    assert found["run_id"] == run and found["status"] == "open"
    assert found["org_id"] == org
    assert found["evidence"] == {"event": event["id"], "stripe_amount": 3000, "ledger_entry_id": credit}
    counted = run_row(db, run)
    assert (counted["seen"], counted["recovered"], counted["already_applied"]) == (1, 0, 0)
    assert counted["resume_cursor"] == datetime.fromtimestamp(event["created"], UTC)
    finished = value(service, "SELECT api.finish_reconciliation_run(%s, 'completed')", (run,))
    assert finished["discrepancies"] == 1 and finished["status"] == "completed"


def test_reconciled_call_that_has_not_ended_is_counted_not_charged(service, db):
    org = open_wallet(service, balance_minor=10_000)
    run = start_run(service, "vapi")
    updated = NOW - timedelta(minutes=1)
    call = payloads.vapi_call(
        assistant_id=route_assistant(service, org),
        status="in-progress",
        started_at=NOW - timedelta(minutes=5),
        updated_at=updated,
    )
    before = snapshot(db)
    answer = value(service, "SELECT api.reconcile_vapi_call(%s, %s)", (run, Jsonb(call)))
    assert answer == {"outcome": "not_ended", "answer": None}
    assert snapshot(db) == before
    counted = run_row(db, run)
    assert (counted["seen"], counted["recovered"], counted["already_applied"]) == (1, 0, 0)
    assert abs(counted["resume_cursor"] - updated) < timedelta(milliseconds=1)
    assert db.execute("SELECT count(*) AS n FROM billing.discrepancies").fetchone()["n"] == 0


# ---------------------------------------------------------------------------- notifications


def test_pending_notifications_are_paged_oldest_first_within_bounds(service, db):
    org = open_wallet(service, balance_minor=1_000)
    service.execute("SELECT * FROM api.set_low_balance_threshold(%s, 500::bigint)", (org,))
    service.execute("SELECT * FROM api.deduct_call_credits(%s, 'call-low', 600)", (org,))  # 1000 - 700
    assert len(notifications(db, org, "low_balance")) == 1
    rows = service.execute("SELECT * FROM api.pending_notifications(1000)").fetchall()
    assert [r["kind"] for r in rows] == ["low_balance"]
    assert rows[0]["details"] == {"balance_minor": 300, "threshold_minor": 500}
    exc = refused(service, "SELECT * FROM api.pending_notifications(NULL)")
    assert exc.sqlstate == "22023" and exc.diag.column_name == "max_rows"
