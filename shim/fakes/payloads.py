"""Builders for provider payloads shaped like the providers' real objects, field for field.

Handlers must be tested against what providers really send, not against the three fields we
happen to read, so every builder emits the full documented object (nulls included).

Sources for the shapes:
- Stripe API reference, "The Checkout Session / PaymentIntent / Charge / Refund / Dispute /
  Balance Transaction / PaymentMethod / Event object" (docs.stripe.com/api, version 2024-06-20).
- Vapi server SDK types (VapiAI/server-sdk-typescript: Call, CostBreakdown, Artifact, Recording,
  ServerMessageEndOfCallReport, ServerMessageStatusUpdate) and Vapi's HMACAuthenticationPlan.
- Twilio "Track the Message Status of Outbound Messages" (status callback parameters) and the
  2023-02-14 changelog adding RawDlrDoneDate to delivered/undelivered callbacks.
"""

import hashlib
import hmac
import secrets
import string
import time
import uuid
from datetime import UTC, datetime, timedelta

from stripe import WebhookSignature
from twilio.request_validator import RequestValidator

from shim.fakes.vapi_types import check_call, check_message

STRIPE_API_VERSION = "2024-06-20"
_ALNUM = string.ascii_letters + string.digits
_VAPI_NUMBER = "+15550100200"


# --------------------------------------------------------------------------- ids and times


def _random_chars(length):
    """Random alphanumerics, the alphabet of Stripe's id suffixes."""
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def stripe_id(prefix, length=24):
    """Mint a Stripe-style id such as `pi_3MtwBwLkdIwHu7ix28a3tqPa`."""
    return f"{prefix}_{_random_chars(length)}"


def checkout_session_id():
    """Mint a test-mode Checkout Session id; real ones are `cs_test_a1` plus 56 characters."""
    return "cs_test_a1" + _random_chars(56)


def twilio_sid(prefix):
    """Mint a Twilio SID: two-letter type prefix plus 32 hex digits (SM..., AC..., MG...)."""
    return prefix + secrets.token_hex(16)


def vapi_iso(moment):
    """Format a datetime the way Vapi does: UTC ISO-8601 with milliseconds and a `Z`."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def _epoch_ms(moment):
    """Milliseconds since the Unix epoch, Vapi's unit for message timestamps."""
    return int(moment.timestamp() * 1000)


def _now():
    """Current Unix time in whole seconds, Stripe's unit for `created`."""
    return int(time.time())


# --------------------------------------------------------------------------- Stripe objects


def _card_details(*, last4="4242", brand="visa"):
    """`card` hash shared by PaymentMethod and Charge.payment_method_details."""
    return {
        "brand": brand,
        "checks": {
            "address_line1_check": None,
            "address_postal_code_check": None,
            "cvc_check": "pass",
        },
        "country": "US",
        "exp_month": 12,
        "exp_year": 2034,
        "fingerprint": "Xt5EWLLDS7FJjR1c",
        "funding": "credit",
        "last4": last4,
        "networks": {"available": [brand], "preferred": None},
        "three_d_secure_usage": {"supported": True},
        "wallet": None,
    }


def _address():
    """An all-null address hash, as Stripe renders one the customer never filled in."""
    keys = ("city", "country", "line1", "line2", "postal_code", "state")
    return dict.fromkeys(keys)


def stripe_payment_method(*, pm_id, customer=None, created=None):
    """A card `payment_method` object (docs.stripe.com/api/payment_methods/object)."""
    card = _card_details()
    card["display_brand"] = card["brand"]
    card["generated_from"] = None
    return {
        "id": pm_id,
        "object": "payment_method",
        "allow_redisplay": "unspecified",
        "billing_details": {"address": _address(), "email": None, "name": None, "phone": None},
        "card": card,
        "created": created or _now(),
        "customer": customer,
        "livemode": False,
        "metadata": {},
        "type": "card",
    }


def stripe_checkout_session(
    *,
    session_id,
    org_id,
    amount_total,
    currency="usd",
    payment_intent=None,
    payment_status="paid",
    status="complete",
    client_reference_id=None,
    metadata=None,
    created=None,
    customer=None,
    customer_email=None,
    success_url="https://app.example.test/billing/success",
    cancel_url="https://app.example.test/billing/cancel",
):
    """A `checkout.session` in payment mode (docs.stripe.com/api/checkout/sessions/object).

    `client_reference_id` defaults to org_id and `metadata` to {"org_id": org_id}. An open
    session carries a `url` and no customer details; a complete one the reverse, like Stripe.
    """
    created = created or _now()
    is_complete = status == "complete"
    customer_details = None
    if is_complete:
        customer_details = {
            "address": {**_address(), "country": "US", "postal_code": "94107"},
            "email": customer_email or "billing@example.test",
            "name": "Test Customer",
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        }
    return {
        "id": session_id,
        "object": "checkout.session",
        "adaptive_pricing": {"enabled": False},
        "after_expiration": None,
        "allow_promotion_codes": None,
        "amount_subtotal": amount_total,
        "amount_total": amount_total,
        "automatic_tax": {"enabled": False, "liability": None, "status": None},
        "billing_address_collection": None,
        "cancel_url": cancel_url,
        "client_reference_id": org_id if client_reference_id is None else client_reference_id,
        "client_secret": None,
        "consent": None,
        "consent_collection": None,
        "created": created,
        "currency": currency,
        "currency_conversion": None,
        "custom_fields": [],
        "custom_text": {
            "after_submit": None,
            "shipping_address": None,
            "submit": None,
            "terms_of_service_acceptance": None,
        },
        "customer": customer,
        "customer_creation": "if_required",
        "customer_details": customer_details,
        "customer_email": customer_email,
        "expires_at": created + 24 * 3600,
        "invoice": None,
        "invoice_creation": {
            "enabled": False,
            "invoice_data": {
                "account_tax_ids": None,
                "custom_fields": None,
                "description": None,
                "footer": None,
                "issuer": None,
                "metadata": {},
                "rendering_options": None,
            },
        },
        "livemode": False,
        "locale": None,
        "metadata": {"org_id": org_id} if metadata is None else metadata,
        "mode": "payment",
        "payment_intent": payment_intent,
        "payment_link": None,
        "payment_method_collection": "if_required",
        "payment_method_configuration_details": None,
        "payment_method_options": {"card": {"request_three_d_secure": "automatic"}},
        "payment_method_types": ["card"],
        "payment_status": payment_status,
        "phone_number_collection": {"enabled": False},
        "recovered_from": None,
        "saved_payment_method_options": None,
        "setup_intent": None,
        "shipping_address_collection": None,
        "shipping_cost": None,
        "shipping_details": None,
        "shipping_options": [],
        "status": status,
        "submit_type": None,
        "subscription": None,
        "success_url": success_url,
        "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        "ui_mode": "hosted",
        "url": f"https://checkout.stripe.test/c/pay/{session_id}" if status == "open" else None,
    }


def stripe_payment_intent(
    *,
    pi_id,
    org_id,
    amount,
    currency="usd",
    status="succeeded",
    metadata=None,
    customer=None,
    payment_method=None,
    latest_charge=None,
    last_payment_error=None,
    created=None,
    setup_future_usage=None,
    description=None,
):
    """A `payment_intent` (docs.stripe.com/api/payment_intents/object); metadata defaults to
    {"org_id": org_id}."""
    return {
        "id": pi_id,
        "object": "payment_intent",
        "amount": amount,
        "amount_capturable": 0,
        "amount_details": {"tip": {}},
        "amount_received": amount if status == "succeeded" else 0,
        "application": None,
        "application_fee_amount": None,
        "automatic_payment_methods": {"allow_redirects": "always", "enabled": True},
        "canceled_at": None,
        "cancellation_reason": None,
        # New PaymentIntents default to automatic_async since API version 2024-04-10.
        "capture_method": "automatic_async",
        "client_secret": f"{pi_id}_secret_{secrets.token_urlsafe(18)}",
        "confirmation_method": "automatic",
        "created": created or _now(),
        "currency": currency,
        "customer": customer,
        "description": description,
        "invoice": None,
        "last_payment_error": last_payment_error,
        "latest_charge": latest_charge,
        "livemode": False,
        "metadata": {"org_id": org_id} if metadata is None else metadata,
        "next_action": None,
        "on_behalf_of": None,
        "payment_method": payment_method,
        "payment_method_configuration_details": None,
        "payment_method_options": {
            "card": {
                "installments": None,
                "mandate_options": None,
                "network": None,
                "request_three_d_secure": "automatic",
            }
        },
        "payment_method_types": ["card"],
        "processing": None,
        "receipt_email": None,
        "review": None,
        "setup_future_usage": setup_future_usage,
        "shipping": None,
        "source": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": status,
        "transfer_data": None,
        "transfer_group": None,
    }


def stripe_charge(
    *,
    charge_id,
    payment_intent,
    amount,
    currency="usd",
    amount_refunded=0,
    refunds=(),
    disputed=False,
    customer=None,
    payment_method=None,
    metadata=None,
    status="succeeded",
    failure_code=None,
    failure_message=None,
    created=None,
):
    """A card `charge` (docs.stripe.com/api/charges/object).

    `refunds` has been expandable-only since API version 2022-11-15; it is rendered here as if
    expanded, so handlers can see refund ids without a second call.
    """
    succeeded = status == "succeeded"
    outcome = {
        "network_status": "approved_by_network" if succeeded else "declined_by_network",
        "reason": None if succeeded else "generic_decline",
        "risk_level": "normal",
        "risk_score": 32,
        "seller_message": "Payment complete."
        if succeeded
        else "The bank did not return any further details with this decline.",
        "type": "authorized" if succeeded else "issuer_declined",
    }
    card = _card_details()
    card.update(
        amount_authorized=amount if succeeded else None,
        extended_authorization={"status": "disabled"},
        incremental_authorization={"status": "unavailable"},
        installments=None,
        mandate=None,
        multicapture={"status": "unavailable"},
        network="visa",
        network_token={"used": False},
        overcapture={"maximum_amount_capturable": amount, "status": "unavailable"},
        three_d_secure=None,
    )
    refunds = list(refunds)
    return {
        "id": charge_id,
        "object": "charge",
        "amount": amount,
        "amount_captured": amount if succeeded else 0,
        "amount_refunded": amount_refunded,
        "application": None,
        "application_fee": None,
        "application_fee_amount": None,
        "balance_transaction": stripe_id("txn") if succeeded else None,
        "billing_details": {"address": _address(), "email": None, "name": None, "phone": None},
        "calculated_statement_descriptor": "CREDITLEDGER",
        "captured": succeeded,
        "created": created or _now(),
        "currency": currency,
        "customer": customer,
        "description": None,
        "disputed": disputed,
        "failure_balance_transaction": None,
        "failure_code": failure_code,
        "failure_message": failure_message,
        "fraud_details": {},
        "invoice": None,
        "livemode": False,
        "metadata": {} if metadata is None else metadata,
        "on_behalf_of": None,
        "outcome": outcome,
        "paid": succeeded,
        "payment_intent": payment_intent,
        "payment_method": payment_method,
        "payment_method_details": {"card": card, "type": "card"},
        "radar_options": {},
        "receipt_email": None,
        "receipt_number": None,
        "receipt_url": f"https://pay.stripe.test/receipts/payment/{charge_id}",
        "refunded": amount_refunded >= amount > 0,
        "refunds": {
            "object": "list",
            "data": refunds,
            "has_more": False,
            "total_count": len(refunds),
            "url": f"/v1/charges/{charge_id}/refunds",
        },
        "review": None,
        "shipping": None,
        "source": None,
        "source_transfer": None,
        "statement_descriptor": None,
        "statement_descriptor_suffix": None,
        "status": status,
        "transfer_data": None,
        "transfer_group": None,
    }


def stripe_refund(
    *,
    refund_id,
    payment_intent,
    charge,
    amount,
    currency="usd",
    status="succeeded",
    reason=None,
    metadata=None,
    created=None,
):
    """A card `refund` (docs.stripe.com/api/refunds/object)."""
    return {
        "id": refund_id,
        "object": "refund",
        "amount": amount,
        "balance_transaction": stripe_id("txn"),
        "charge": charge,
        "created": created or _now(),
        "currency": currency,
        "destination_details": {
            "card": {
                "reference": f"{secrets.randbelow(10**12):012d}",
                "reference_status": "available",
                "reference_type": "acquirer_reference_number",
                "type": "refund",
            },
            "type": "card",
        },
        "metadata": {} if metadata is None else metadata,
        "payment_intent": payment_intent,
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": status,
        "transfer_reversal": None,
    }


def stripe_balance_transaction(
    *, txn_id, amount, currency, source, reporting_category, fee=0, description=None, created=None
):
    """A `balance_transaction` (docs.stripe.com/api/balance_transactions/object), as embedded in
    `dispute.balance_transactions`: reporting_category "dispute" for the withdrawal and
    "dispute_reversal" for the reinstatement, both of type "adjustment"."""
    created = created or _now()
    fee_details = []
    if fee:
        fee_details = [
            {
                "amount": fee,
                "application": None,
                "currency": currency,
                "description": "Dispute fee",
                "type": "stripe_fee",
            }
        ]
    return {
        "id": txn_id,
        "object": "balance_transaction",
        "amount": amount,
        "available_on": created,
        "created": created,
        "currency": currency,
        "description": description,
        "exchange_rate": None,
        "fee": fee,
        "fee_details": fee_details,
        "net": amount - fee,
        "reporting_category": reporting_category,
        "source": source,
        "status": "available",
        "type": "adjustment",
    }


def stripe_dispute(
    *,
    dispute_id,
    payment_intent,
    charge,
    amount,
    currency="usd",
    status="needs_response",
    reason="fraudulent",
    balance_transactions=(),
    created=None,
):
    """A card `dispute` (docs.stripe.com/api/disputes/object); status is one of
    warning_needs_response, warning_under_review, warning_closed, needs_response, under_review,
    won, lost."""
    created = created or _now()
    evidence_keys = (
        "access_activity_log",
        "billing_address",
        "cancellation_policy",
        "cancellation_policy_disclosure",
        "cancellation_rebuttal",
        "customer_communication",
        "customer_email_address",
        "customer_name",
        "customer_purchase_ip",
        "customer_signature",
        "duplicate_charge_documentation",
        "duplicate_charge_explanation",
        "duplicate_charge_id",
        "product_description",
        "receipt",
        "refund_policy",
        "refund_policy_disclosure",
        "refund_refusal_explanation",
        "service_date",
        "service_documentation",
        "shipping_address",
        "shipping_carrier",
        "shipping_date",
        "shipping_documentation",
        "shipping_tracking_number",
        "uncategorized_file",
        "uncategorized_text",
    )
    return {
        "id": dispute_id,
        "object": "dispute",
        "amount": amount,
        "balance_transactions": list(balance_transactions),
        "charge": charge,
        "created": created,
        "currency": currency,
        "enhanced_eligibility_types": [],
        "evidence": dict.fromkeys(evidence_keys),
        "evidence_details": {
            "due_by": created + 21 * 24 * 3600,
            "enhanced_eligibility": {},
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        "is_charge_refundable": False,
        "livemode": False,
        "metadata": {},
        "network_reason_code": "10.4",
        "payment_intent": payment_intent,
        "payment_method_details": {
            "card": {"brand": "visa", "case_type": "chargeback", "network_reason_code": "10.4"},
            "type": "card",
        },
        "reason": reason,
        "status": status,
    }


def stripe_event(
    *,
    event_id,
    event_type,
    data_object,
    created=None,
    previous_attributes=None,
    request_id=None,
    idempotency_key=None,
    pending_webhooks=1,
):
    """An `event` envelope (docs.stripe.com/api/events/object). `request` ids are null for
    events Stripe raises on its own (e.g. a customer paying on the Checkout page)."""
    data = {"object": data_object}
    if previous_attributes is not None:
        data["previous_attributes"] = previous_attributes
    return {
        "id": event_id,
        "object": "event",
        "api_version": STRIPE_API_VERSION,
        "created": created or _now(),
        "data": data,
        "livemode": False,
        "pending_webhooks": pending_webhooks,
        "request": {"id": request_id, "idempotency_key": idempotency_key},
        "type": event_type,
    }


def sign_stripe(payload_bytes, secret, timestamp=None):
    """The `Stripe-Signature` header value (`t=...,v1=...`) for a webhook body."""
    return WebhookSignature.generate_signature_header(payload_bytes.decode("utf-8"), secret, timestamp)


# --------------------------------------------------------------------------- Vapi objects

# Demo per-minute rates (USD) used when a call's cost is not given explicitly.
_VAPI_RATES = {"transport": 0.01, "stt": 0.01, "llm": 0.02, "tts": 0.03, "vapi": 0.05}


def _duration_ms(started_at, ended_at):
    """Call length in milliseconds; zero when the call never connected or has not ended."""
    if started_at is None or ended_at is None:
        return 0
    return max(0, int((ended_at - started_at).total_seconds() * 1000))


def _cost_parts(minutes, cost):
    """Split a call cost over Vapi's components so the parts add up exactly to the total."""
    per_minute = sum(_VAPI_RATES.values())
    total = round(per_minute * minutes, 6) if cost is None else cost
    parts = {k: round(total * rate / per_minute, 6) for k, rate in _VAPI_RATES.items()}
    parts["vapi"] = round(total - sum(v for k, v in parts.items() if k != "vapi"), 6)
    return total, parts


def _conversation(started_at):
    """A short two-turn conversation in Vapi's `messages` shape, timed from call start."""
    if started_at is None:
        return []
    t0 = _epoch_ms(started_at)
    return [
        {
            "role": "system",
            "message": "You are the Credit Ledger demo assistant.",
            "time": t0,
            "secondsFromStart": 0,
        },
        {
            "role": "bot",
            "message": "Hi, thanks for calling. How can I help?",
            "time": t0 + 600,
            "endTime": t0 + 2600,
            "secondsFromStart": 0.6,
            "duration": 2000,
            "source": "",
        },
        {
            "role": "user",
            "message": "Just checking my balance, thanks.",
            "time": t0 + 3100,
            "endTime": t0 + 4900,
            "secondsFromStart": 3.1,
            "duration": 1800,
        },
    ]


def _openai_format(messages):
    """`messagesOpenAIFormatted`: the same turns with OpenAI chat roles."""
    roles = {"system": "system", "bot": "assistant", "user": "user"}
    return [{"role": roles[m["role"]], "content": m["message"]} for m in messages]


def _transcript(messages):
    """Plain-text transcript, `AI:`/`User:` lines, as in `artifact.transcript`."""
    speakers = {"bot": "AI", "user": "User"}
    return "\n".join(f"{speakers[m['role']]}: {m['message']}" for m in messages if m["role"] in speakers)


def vapi_call(
    *,
    call_id=None,
    overrides_metadata=None,
    started_at=None,
    ended_at=None,
    status="ended",
    ended_reason="customer-ended-call",
    assistant_id=None,
    phone_number_id=None,
    vapi_org_id=None,
    cost=None,
    call_type="outboundPhoneCall",
    customer_number="+15555550123",
    created_at=None,
    updated_at=None,
):
    """A Vapi Call object as returned by GET /call (Vapi server SDK `Call` type).

    `overrides_metadata` becomes assistantOverrides.metadata: what whoever started the call set
    (a browser can); it never decides who pays. `vapi_org_id` is Vapi's own `orgId`.
    started_at/ended_at are aware datetimes; ended fields (endedAt,
    endedReason, cost, artifact...) appear only when the call has ended. Without `cost`, the
    cost is derived from the duration at demo rates; the breakdown always sums to `cost`.
    """
    call_id = call_id or str(uuid.uuid4())
    vapi_org_id = vapi_org_id or str(uuid.uuid4())
    anchor = started_at or ended_at or datetime.now(UTC)
    created_at = created_at or anchor - timedelta(seconds=2)
    ended = status == "ended"
    if updated_at is None:
        updated_at = ended_at + timedelta(seconds=4) if ended and ended_at else created_at
    call = {
        "id": call_id,
        "orgId": vapi_org_id,
        "type": call_type,
        "createdAt": vapi_iso(created_at),
        "updatedAt": vapi_iso(updated_at),
        "status": status,
        "phoneCallProvider": "twilio",
        "phoneCallProviderId": twilio_sid("CA"),
        "phoneCallTransport": "pstn",
        "assistantId": assistant_id or str(uuid.uuid4()),
        "phoneNumberId": phone_number_id or str(uuid.uuid4()),
        "customer": {"number": customer_number},
        "monitor": {
            "listenUrl": f"wss://phone-call-websocket.vapi.test/{call_id}/listen",
            "controlUrl": f"https://phone-call-websocket.vapi.test/{call_id}/control",
        },
        "messages": _conversation(started_at),
        "costs": [],
    }
    if overrides_metadata is not None:
        call["assistantOverrides"] = {"metadata": overrides_metadata}
    if started_at is not None:
        call["startedAt"] = vapi_iso(started_at)
    if not ended:
        return check_call(call)

    minutes = _duration_ms(started_at, ended_at) / 60000
    total, parts = _cost_parts(minutes, cost)
    messages = call["messages"]
    prompt_tokens, completion_tokens = int(900 * minutes), int(120 * minutes)
    tts_characters = int(750 * minutes)
    recording = f"https://storage.vapi.test/{call_id}-mono.wav" if messages else None
    stereo = f"https://storage.vapi.test/{call_id}-stereo.wav" if messages else None
    call.update(
        endedReason=ended_reason,
        cost=total,
        costBreakdown={
            "transport": parts["transport"],
            "stt": parts["stt"],
            "llm": parts["llm"],
            "tts": parts["tts"],
            "vapi": parts["vapi"],
            "total": total,
            "llmPromptTokens": prompt_tokens,
            "llmCompletionTokens": completion_tokens,
            "ttsCharacters": tts_characters,
            "analysisCostBreakdown": {
                "summary": 0,
                "summaryPromptTokens": 0,
                "summaryCompletionTokens": 0,
                "structuredData": 0,
                "structuredDataPromptTokens": 0,
                "structuredDataCompletionTokens": 0,
                "successEvaluation": 0,
                "successEvaluationPromptTokens": 0,
                "successEvaluationCompletionTokens": 0,
            },
        },
        costs=[
            {"type": "transport", "provider": "twilio", "minutes": minutes, "cost": parts["transport"]},
            {
                "type": "transcriber",
                "transcriber": {"provider": "deepgram", "model": "nova-2"},
                "minutes": minutes,
                "cost": parts["stt"],
            },
            {
                "type": "model",
                "model": {"provider": "openai", "model": "gpt-4o"},
                "promptTokens": prompt_tokens,
                "completionTokens": completion_tokens,
                "cost": parts["llm"],
            },
            {
                "type": "voice",
                "voice": {"provider": "11labs", "voiceId": "burt"},
                "characters": tts_characters,
                "cost": parts["tts"],
            },
            {"type": "vapi", "subType": "normal", "minutes": minutes, "cost": parts["vapi"]},
        ],
        artifact={
            "messages": messages,
            "messagesOpenAIFormatted": _openai_format(messages),
            "transcript": _transcript(messages),
            "recordingUrl": recording,
            "stereoRecordingUrl": stereo,
            "recording": {
                "stereoUrl": stereo,
                "mono": {"combinedUrl": recording, "assistantUrl": None, "customerUrl": None},
            },
        },
        analysis={
            "summary": "The caller asked about their balance." if messages else "",
            "successEvaluation": "true" if messages else "false",
            "structuredData": {},
        },
    )
    if ended_at is not None:
        call["endedAt"] = vapi_iso(ended_at)
    return check_call(call)


def _parse_vapi_time(value):
    """Parse a Vapi ISO timestamp (with `Z`) back into an aware datetime, or None."""
    return datetime.fromisoformat(value) if value else None


def _message_context(call):
    """The assistant, phoneNumber and customer objects Vapi attaches to server messages."""
    return {
        "assistant": {
            "id": call["assistantId"],
            "orgId": call["orgId"],
            "name": "Credit Ledger Demo Assistant",
            "model": {"provider": "openai", "model": "gpt-4o"},
            "voice": {"provider": "11labs", "voiceId": "burt"},
            "transcriber": {"provider": "deepgram", "model": "nova-2"},
            "serverMessages": ["end-of-call-report", "status-update"],
            "createdAt": call["createdAt"],
            "updatedAt": call["createdAt"],
        },
        "phoneNumber": {
            "id": call["phoneNumberId"],
            "orgId": call["orgId"],
            "provider": "twilio",
            "number": _VAPI_NUMBER,
            "name": "Main line",
            "status": "active",
            "twilioAccountSid": "AC" + "0" * 32,
            "createdAt": call["createdAt"],
            "updatedAt": call["createdAt"],
        },
        "customer": call["customer"],
    }


def vapi_end_of_call_report(call, *, started_at=None, ended_at=None):
    """An `end-of-call-report` server message wrapping an ended `call` (from vapi_call).

    started_at/ended_at default to the call's own; pass them to make the report disagree with
    the call object. Besides the SDK's fields, Vapi still sends the legacy top-level
    durationMs/durationSeconds/durationMinutes, transcript, summary, recordingUrl and messages.
    """
    started_at = started_at or _parse_vapi_time(call.get("startedAt"))
    ended_at = ended_at or _parse_vapi_time(call.get("endedAt"))
    duration_ms = _duration_ms(started_at, ended_at)
    artifact = call["artifact"]
    message = {
        "type": "end-of-call-report",
        "timestamp": _epoch_ms(ended_at or datetime.now(UTC)) + 3000,
        "endedReason": call["endedReason"],
        "durationMs": duration_ms,
        "durationSeconds": duration_ms / 1000,
        "durationMinutes": round(duration_ms / 60000, 4),
        "cost": call["cost"],
        "costBreakdown": call["costBreakdown"],
        "costs": call["costs"],
        "artifact": artifact,
        "analysis": call["analysis"],
        "transcript": artifact["transcript"],
        "summary": call["analysis"]["summary"],
        "recordingUrl": artifact["recordingUrl"],
        "stereoRecordingUrl": artifact["stereoRecordingUrl"],
        "messages": artifact["messages"],
        "call": call,
        **_message_context(call),
    }
    if started_at is not None:
        message["startedAt"] = vapi_iso(started_at)
    if ended_at is not None:
        message["endedAt"] = vapi_iso(ended_at)
    return check_message({"message": message})


def vapi_status_update(call, status, *, ended_reason=None):
    """A `status-update` server message (sent whenever call.status changes); endedReason is
    only present when status is "ended"."""
    messages = call.get("messages", [])
    message = {
        "type": "status-update",
        "status": status,
        "timestamp": int(time.time() * 1000),
        "artifact": {"messages": messages, "messagesOpenAIFormatted": _openai_format(messages)},
        "call": call,
        **_message_context(call),
    }
    if status == "ended":
        message["endedReason"] = ended_reason or call.get("endedReason", "customer-ended-call")
    return check_message({"message": message})


def vapi_assistant_request(call):
    """An `assistant-request` server message: Vapi asks which assistant answers an inbound call
    (`call` from vapi_call with call_type="inboundPhoneCall", status "ringing"). No assistant is
    attached yet: choosing one is what the answer does."""
    context = _message_context(call)
    waiting = {k: v for k, v in call.items() if k != "assistantId"}
    message = {
        "type": "assistant-request",
        "timestamp": int(time.time() * 1000),
        "call": waiting,
        "phoneNumber": context["phoneNumber"],
        "customer": context["customer"],
    }
    return check_message({"message": message})


def vapi_hmac_headers(body_bytes, secret, timestamp=None):
    """Headers Vapi's HMAC server credential sends with defaults: hex HMAC-SHA256 over
    "{timestamp}.{body}" in `x-signature`, the timestamp (Unix ms here) in `x-timestamp`."""
    timestamp = int(time.time() * 1000) if timestamp is None else timestamp
    signed = f"{timestamp}.".encode() + body_bytes
    signature = hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()
    return {"x-signature": signature, "x-timestamp": str(timestamp)}


# --------------------------------------------------------------------------- Twilio


def twilio_status_callback(
    *,
    message_sid,
    status,
    account_sid,
    from_,
    to,
    messaging_service_sid=None,
    error_code=None,
    raw_dlr_done_date=None,
):
    """Form fields Twilio POSTs to an SMS StatusCallback URL, all strings.

    ErrorCode only accompanies failed/undelivered (default 30003 "Unreachable destination
    handset" / 30008 "Unknown error"); RawDlrDoneDate (YYMMDDhhmm, carrier's DLR done date)
    only delivered/undelivered.
    """
    params = {
        "SmsSid": message_sid,
        "SmsStatus": status,
        "MessageStatus": status,
        "To": to,
        "MessageSid": message_sid,
        "AccountSid": account_sid,
        "From": from_,
        "ApiVersion": "2010-04-01",
    }
    if messaging_service_sid:
        params["MessagingServiceSid"] = messaging_service_sid
    if status in ("failed", "undelivered"):
        default_code = "30003" if status == "undelivered" else "30008"
        params["ErrorCode"] = str(error_code or default_code)
    if status in ("delivered", "undelivered"):
        params["RawDlrDoneDate"] = raw_dlr_done_date or datetime.now(UTC).strftime("%y%m%d%H%M")
    return params


def sign_twilio(url, params, auth_token):
    """The `X-Twilio-Signature` value for a form POST to `url` (HMAC-SHA1, base64)."""
    return RequestValidator(auth_token).compute_signature(url, params)
