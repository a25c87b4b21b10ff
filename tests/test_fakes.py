"""The provider fakes behave the way the real SDKs and webhook verifiers expect (no database)."""

import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import requests
import stripe
from flask import Flask, request
from twilio.request_validator import RequestValidator

from shim.fakes import payloads, stripe_api, vapi_api
from shim.fakes.serve import serve_in_thread

WEBHOOK_SECRET = "whsec_test_fakes"
VAPI_KEY = "vapi-private-key"


def control(base_url, path, body=None):
    """POST to a fake's control API and return its JSON answer."""
    response = requests.post(f"{base_url}/_control/{path}", json=body or {}, timeout=10)
    response.raise_for_status()
    return response.json()


def stats(base_url):
    """The fake's counters."""
    return requests.get(f"{base_url}/_control/stats", timeout=10).json()


@pytest.fixture
def receiver():
    """A webhook endpoint recording every Stripe delivery (raw body, signature header)."""
    app = Flask("receiver")
    received = []

    @app.post("/stripe")
    def hook():
        received.append((request.get_data(), request.headers["Stripe-Signature"]))
        return "", 200

    base_url, stop = serve_in_thread(app)
    yield SimpleNamespace(url=f"{base_url}/stripe", received=received)
    stop()


@pytest.fixture
def fake_stripe(receiver):
    """The Stripe fake wired to `receiver`, plus a StripeClient pointed at it."""
    base_url, stop = serve_in_thread(stripe_api.create_app(receiver.url, WEBHOOK_SECRET))
    client = stripe.StripeClient("sk_test_fake", base_addresses={"api": base_url}, max_network_retries=0)
    yield SimpleNamespace(url=base_url, client=client, received=receiver.received)
    stop()


def checkout_params(org_id="org_1", amount=2500):
    """Checkout Session parameters as the shim sends them for a top-up."""
    return {
        "mode": "payment",
        "client_reference_id": org_id,
        "metadata": {"org_id": org_id},
        "payment_intent_data": {"metadata": {"org_id": org_id, "topup": "manual"}},
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": amount,
                    "product_data": {"name": "Voice credits"},
                },
            }
        ],
        "success_url": "https://app.example.test/ok",
        "cancel_url": "https://app.example.test/cancel",
    }


def delivered_events(fake):
    """Verify every delivery with stripe-python and return the events in arrival order."""
    return [
        stripe.Webhook.construct_event(body, signature, WEBHOOK_SECRET) for body, signature in fake.received
    ]


# --------------------------------------------------------------------------- Stripe fake


def test_checkout_session_replays_for_same_idempotency_key(fake_stripe):
    sessions = fake_stripe.client.v1.checkout.sessions
    options = {"idempotency_key": "topup-org_1-1"}

    first = sessions.create(params=checkout_params(), options=options)
    second = sessions.create(params=checkout_params(), options=options)

    assert first.id == second.id and first.id.startswith("cs_test_")
    assert first.status == "open" and first.payment_status == "unpaid"
    assert first.amount_total == 2500 and first.currency == "usd"
    assert first.url == f"https://checkout.stripe.test/c/pay/{first.id}"
    assert first.client_reference_id == "org_1" and first.metadata["org_id"] == "org_1"
    assert second.last_response.headers["Idempotent-Replayed"] == "true"
    counts = stats(fake_stripe.url)["endpoints"]["POST /v1/checkout/sessions"]
    assert counts == {"calls": 2, "created": 1, "replayed": 1, "failed": 0}


def test_idempotency_key_reused_with_other_params_is_rejected(fake_stripe):
    sessions = fake_stripe.client.v1.checkout.sessions
    options = {"idempotency_key": "topup-org_1-2"}
    sessions.create(params=checkout_params(amount=2500), options=options)

    with pytest.raises(stripe.IdempotencyError) as caught:
        sessions.create(params=checkout_params(amount=9900), options=options)

    assert caught.value.http_status == 400
    assert "same parameters" in caught.value.user_message
    assert stats(fake_stripe.url)["objects"]["checkout.session"] == 1


def test_completing_a_session_delivers_signed_events_with_intent_metadata(fake_stripe):
    session = fake_stripe.client.v1.checkout.sessions.create(params=checkout_params())

    result = control(fake_stripe.url, f"complete_session/{session.id}")

    events = delivered_events(fake_stripe)
    assert [e.type for e in events] == ["checkout.session.completed", "payment_intent.succeeded"]
    completed, succeeded = events
    assert completed.data.object.id == session.id
    assert completed.data.object.payment_status == "paid"
    assert completed.data.object.payment_intent == result["payment_intent"]["id"]
    assert completed.request.id is None  # raised by the customer paying, not an API call
    intent = succeeded.data.object
    assert intent.metadata.to_dict() == {"org_id": "org_1", "topup": "manual"}
    assert intent.amount_received == 2500 and intent.latest_charge.startswith("ch_")
    retrieved = fake_stripe.client.v1.checkout.sessions.retrieve(
        session.id, params={"expand": ["payment_intent"]}
    )
    assert retrieved.status == "complete" and retrieved.url is None
    assert retrieved.payment_intent.id == intent.id
    listed = fake_stripe.client.v1.events.list(params={"type": "checkout.session.*"})
    assert [e.id for e in listed.data] == [completed.id]


def test_webhook_signature_is_rejected_with_the_wrong_secret(fake_stripe):
    session = fake_stripe.client.v1.checkout.sessions.create(params=checkout_params())
    control(fake_stripe.url, f"complete_session/{session.id}")
    body, signature = fake_stripe.received[0]

    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body, signature, "whsec_someone_else")


def test_off_session_payment_intent_succeeds_and_emits_event(fake_stripe):
    intent = fake_stripe.client.v1.payment_intents.create(
        params={
            "amount": 2000,
            "currency": "usd",
            "customer": "cus_auto",
            "payment_method": "pm_card_ok",
            "confirm": True,
            "off_session": True,
            "metadata": {"org_id": "org_9", "reason": "auto_recharge"},
        },
        options={"idempotency_key": "recharge-org_9-1"},
    )

    assert intent.status == "succeeded" and intent.amount_received == 2000
    assert intent.customer == "cus_auto" and intent.payment_method == "pm_card_ok"
    (event,) = delivered_events(fake_stripe)
    assert event.type == "payment_intent.succeeded" and event.data.object.id == intent.id
    assert event.request.idempotency_key == "recharge-org_9-1"
    assert fake_stripe.client.v1.payment_intents.retrieve(intent.id).status == "succeeded"


@pytest.mark.parametrize("code", ["card_declined", "authentication_required"])
def test_declined_off_session_payment_raises_card_error_and_replays(fake_stripe, code):
    control(fake_stripe.url, "decline", {"payment_method": "pm_card_bad", "code": code})
    params = {
        "amount": 2000,
        "currency": "usd",
        "customer": "cus_auto",
        "payment_method": "pm_card_bad",
        "confirm": True,
        "off_session": True,
        "metadata": {"org_id": "org_9"},
    }
    options = {"idempotency_key": f"recharge-{code}"}

    with pytest.raises(stripe.CardError) as first:
        fake_stripe.client.v1.payment_intents.create(params=params, options=options)
    with pytest.raises(stripe.CardError) as replay:
        fake_stripe.client.v1.payment_intents.create(params=params, options=options)

    assert first.value.http_status == 402 and first.value.code == code
    intent = first.value.error.payment_intent
    assert intent.status == "requires_payment_method"
    assert intent.last_payment_error.code == code
    assert bool(first.value.error.charge) == (code == "card_declined")
    assert replay.value.error.payment_intent.id == intent.id
    assert replay.value.headers["Idempotent-Replayed"] == "true"
    (event,) = delivered_events(fake_stripe)
    assert event.type == "payment_intent.payment_failed"
    counts = stats(fake_stripe.url)["endpoints"]["POST /v1/payment_intents"]
    assert counts == {"calls": 2, "created": 0, "replayed": 1, "failed": 1}


def test_events_auto_paginate_newest_first_across_pages(fake_stripe):
    inserted = [
        control(
            fake_stripe.url,
            "insert_event",
            {
                "type": "payment_intent.succeeded",
                "created": 1_700_000_000 + i // 10,
                "data": {"object": {"id": f"pi_{i}", "object": "payment_intent"}},
            },
        )["id"]
        for i in range(250)
    ]

    page = fake_stripe.client.v1.events.list(params={"limit": 100})
    seen = [event.id for event in page.auto_paging_iter()]

    assert seen == inserted[::-1]
    assert stats(fake_stripe.url)["endpoints"]["GET /v1/events"]["calls"] == 3
    recent = fake_stripe.client.v1.events.list(params={"limit": 100, "created": {"gte": 1_700_000_020}})
    assert [e.id for e in recent.data] == inserted[:199:-1] and not recent.has_more
    before = requests.get(
        f"{fake_stripe.url}/v1/events",
        params={"limit": 3, "ending_before": inserted[10]},
        headers={"Authorization": "Bearer sk_test_fake"},
        timeout=10,
    ).json()
    assert [e["id"] for e in before["data"]] == inserted[13:10:-1] and before["has_more"]


def test_injected_rate_limit_answers_429_once(fake_stripe):
    control(fake_stripe.url, "fail", {"count": 1, "status": 429, "path_prefix": "/v1/events"})

    with pytest.raises(stripe.RateLimitError) as caught:
        fake_stripe.client.v1.events.list()
    listed = fake_stripe.client.v1.events.list()

    assert caught.value.http_status == 429 and caught.value.error.code == "rate_limit"
    assert listed.data == [] and not listed.has_more
    assert stats(fake_stripe.url)["injected_failures"] == 1


def test_injected_500_is_not_saved_so_a_retry_with_the_same_key_executes(fake_stripe):
    control(fake_stripe.url, "fail", {"count": 1, "status": 500})
    sessions = fake_stripe.client.v1.checkout.sessions
    options = {"idempotency_key": "topup-after-outage"}

    with pytest.raises(stripe.APIError):
        sessions.create(params=checkout_params(), options=options)
    session = sessions.create(params=checkout_params(), options=options)

    assert session.status == "open"
    assert "Idempotent-Replayed" not in session.last_response.headers
    counts = stats(fake_stripe.url)["endpoints"]["POST /v1/checkout/sessions"]
    assert counts == {"calls": 2, "created": 1, "replayed": 0, "failed": 1}


def test_refund_and_dispute_lifecycle_events(fake_stripe):
    session = fake_stripe.client.v1.checkout.sessions.create(params=checkout_params())
    pi_id = control(fake_stripe.url, f"complete_session/{session.id}")["payment_intent"]["id"]
    fake_stripe.received.clear()

    refund = control(fake_stripe.url, "refund", {"payment_intent": pi_id, "amount": 500})
    dispute = control(fake_stripe.url, "dispute", {"payment_intent": pi_id})["dispute"]
    control(fake_stripe.url, f"dispute_close/{dispute['id']}", {"status": "won"})

    events = delivered_events(fake_stripe)
    assert [e.type for e in events] == [
        "charge.refunded",
        "refund.created",
        "charge.dispute.created",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.closed",
        "charge.dispute.funds_reinstated",
    ]
    charge = events[0].data.object
    assert charge.amount_refunded == 500 and not charge.refunded
    assert charge.refunds.data[0].id == refund["refund"]["id"]
    assert events[1].data.object.payment_intent == pi_id
    assert dispute["id"].startswith("dp_") and dispute["status"] == "needs_response"
    reinstated = events[-1].data.object
    assert reinstated.status == "won"
    assert [t.amount for t in reinstated.balance_transactions] == [-2500, 2500]


def test_paused_and_dropped_deliveries_stay_listable_for_reconciliation(fake_stripe):
    control(fake_stripe.url, "webhooks", {"deliver": False})
    session = fake_stripe.client.v1.checkout.sessions.create(params=checkout_params())
    control(fake_stripe.url, f"complete_session/{session.id}")

    assert fake_stripe.received == []
    listed = fake_stripe.client.v1.events.list(
        params={"types": ["checkout.session.completed", "payment_intent.succeeded"]}
    )
    assert len(listed.data) == 2
    assert stats(fake_stripe.url)["webhooks"]["paused"] == 2

    control(fake_stripe.url, "webhooks", {"deliver": True, "drop_ratio": 1.0})
    control(fake_stripe.url, "insert_event", {"type": "charge.refunded"})
    assert fake_stripe.received == []
    control(fake_stripe.url, "webhooks", {"drop_ratio": 0.0})
    control(fake_stripe.url, "redeliver")
    assert len(delivered_events(fake_stripe)) == 3
    assert stats(fake_stripe.url)["webhooks"]["undelivered"] == []


def test_unknown_ids_and_bad_keys_get_stripe_errors(fake_stripe):
    with pytest.raises(stripe.InvalidRequestError) as missing:
        fake_stripe.client.v1.payment_intents.retrieve("pi_nope")
    assert missing.value.http_status == 404 and missing.value.code == "resource_missing"

    intruder = stripe.StripeClient(
        "pk_test_wrong", base_addresses={"api": fake_stripe.url}, max_network_retries=0
    )
    with pytest.raises(stripe.AuthenticationError):
        intruder.v1.events.list()


# --------------------------------------------------------------------------- Vapi fake


@pytest.fixture
def fake_vapi():
    """The Vapi fake, loaded with 1100 ended calls a minute apart (newest last)."""
    base_url, stop = serve_in_thread(vapi_api.create_app(VAPI_KEY))
    start = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    calls = [
        payloads.vapi_call(
            started_at=start + timedelta(minutes=i),
            ended_at=start + timedelta(minutes=i, seconds=42),
            assistant_id="asst-even" if i % 2 == 0 else "asst-odd",
        )
        for i in range(1100)
    ]
    control(base_url, "calls", calls)
    yield SimpleNamespace(url=base_url, calls=calls)
    stop()


def list_calls(fake, key=VAPI_KEY, **query):
    """GET /call on the Vapi fake."""
    return requests.get(
        f"{fake.url}/call",
        params=query,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_vapi_list_defaults_to_100_newest_first(fake_vapi):
    response = list_calls(fake_vapi)

    calls = response.json()
    assert response.status_code == 200 and isinstance(calls, list)
    assert [c["id"] for c in calls] == [c["id"] for c in fake_vapi.calls[::-1][:100]]


def test_vapi_list_limit_is_capped_at_1000(fake_vapi):
    assert len(list_calls(fake_vapi, limit=1000).json()) == 1000

    rejected = list_calls(fake_vapi, limit=1001)

    assert rejected.status_code == 400
    assert rejected.json()["message"] == ["limit must not be greater than 1000"]


def test_vapi_filters_by_created_at_and_assistant(fake_vapi):
    pivot = fake_vapi.calls[1095]["createdAt"]

    calls = list_calls(fake_vapi, createdAtGe=pivot, assistantId="asst-odd").json()

    assert [c["id"] for c in calls] == [fake_vapi.calls[i]["id"] for i in (1099, 1097, 1095)]
    assert list_calls(fake_vapi, createdAtGt="yesterday").status_code == 400


def test_vapi_rejects_bad_keys_and_injects_throttling(fake_vapi):
    assert list_calls(fake_vapi, key="wrong").status_code == 401

    control(fake_vapi.url, "fail", {"count": 1, "status": 429})
    throttled = list_calls(fake_vapi)

    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "0"
    assert list_calls(fake_vapi, limit=1).status_code == 200
    counters = stats(fake_vapi.url)
    assert counters["unauthorized"] == 1 and counters["injected_failures"] == 1
    assert counters["queries"][-1] == {"limit": "1"}


# --------------------------------------------------------------------------- payload builders


def test_checkout_session_builder_has_every_documented_field():
    session = payloads.stripe_checkout_session(
        session_id="cs_test_a1x", org_id="org_1", amount_total=1000, payment_intent="pi_1"
    )

    documented = {
        "id",
        "object",
        "after_expiration",
        "allow_promotion_codes",
        "amount_subtotal",
        "amount_total",
        "automatic_tax",
        "billing_address_collection",
        "cancel_url",
        "client_reference_id",
        "consent",
        "currency",
        "customer",
        "customer_creation",
        "customer_details",
        "customer_email",
        "expires_at",
        "invoice",
        "livemode",
        "locale",
        "metadata",
        "mode",
        "payment_intent",
        "payment_link",
        "payment_method_collection",
        "payment_method_types",
        "payment_status",
        "phone_number_collection",
        "recovered_from",
        "setup_intent",
        "shipping_address_collection",
        "shipping_cost",
        "shipping_details",
        "status",
        "submit_type",
        "subscription",
        "success_url",
        "total_details",
        "url",
    }
    assert documented <= session.keys()
    assert session["client_reference_id"] == "org_1" and session["metadata"] == {"org_id": "org_1"}
    assert session["status"] == "complete" and session["url"] is None


def test_vapi_end_of_call_report_is_consistent_with_its_call():
    start = datetime(2025, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)
    call = payloads.vapi_call(
        call_id="call-1",
        overrides_metadata={"org_id": "org_7"},
        started_at=start,
        ended_at=start + timedelta(seconds=90),
        cost=0.37,
    )

    message = payloads.vapi_end_of_call_report(call)["message"]

    assert message["type"] == "end-of-call-report" and message["call"] is call
    assert message["startedAt"] == "2025-03-01T12:00:00.250Z"
    assert message["durationMs"] == 90_000 and message["durationSeconds"] == 90.0
    assert message["durationMinutes"] == 1.5
    breakdown = message["costBreakdown"]
    parts = sum(breakdown[k] for k in ("transport", "stt", "llm", "tts", "vapi"))
    assert breakdown["total"] == message["cost"] == 0.37 and abs(parts - 0.37) < 1e-9
    assert call["assistantOverrides"]["metadata"]["org_id"] == "org_7"
    assert message["artifact"]["transcript"].startswith("AI: ")
    update = payloads.vapi_status_update(call, "ended")["message"]
    assert update["type"] == "status-update" and update["endedReason"] == "customer-ended-call"


def test_vapi_hmac_headers_sign_timestamp_dot_body():
    body = json.dumps({"message": {"type": "status-update"}}).encode()

    headers = payloads.vapi_hmac_headers(body, "vapi-secret", timestamp=1_700_000_000_000)

    expected = hmac.new(b"vapi-secret", b"1700000000000." + body, hashlib.sha256).hexdigest()
    assert headers == {"x-signature": expected, "x-timestamp": "1700000000000"}


def test_twilio_status_callback_signature_validates():
    url = "https://shim.example.test/webhooks/twilio/status"
    params = payloads.twilio_status_callback(
        message_sid=payloads.twilio_sid("SM"),
        status="undelivered",
        account_sid=payloads.twilio_sid("AC"),
        from_="+15550100200",
        to="+15555550123",
    )

    signature = payloads.sign_twilio(url, params, "twilio-auth-token")

    validator = RequestValidator("twilio-auth-token")
    assert validator.validate(url, params, signature)
    assert not validator.validate(url, {**params, "MessageStatus": "delivered"}, signature)
    assert params["ErrorCode"] == "30003" and len(params["RawDlrDoneDate"]) == 10
    delivered = payloads.twilio_status_callback(
        message_sid="SM1", status="delivered", account_sid="AC1", from_="+1", to="+2"
    )
    assert "ErrorCode" not in delivered and delivered["ApiVersion"] == "2010-04-01"
