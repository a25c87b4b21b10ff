"""Signed deliveries, made the way each provider makes them, for the shim's tests."""

import json
import time

from shim.fakes import payloads
from tests.conftest import SECRETS
from tests.db_helpers import open_wallet

TWILIO_PATH = "/webhooks/twilio/sms-status"

# What Prometheus sends with `authorization: credentials_file:` holding METRICS_TOKEN.
METRICS_AUTH = {"Authorization": f"Bearer {SECRETS['metrics_token']}"}


def stripe_event(event_type: str, obj: dict, event_id: str | None = None) -> dict:
    """A full Stripe event envelope around an object."""
    return payloads.stripe_event(
        event_id=event_id or payloads.stripe_id("evt_"), event_type=event_type, data_object=obj
    )


def post_stripe(
    client,
    event: dict,
    secret: str = SECRETS["stripe_webhook_secret"],
    timestamp: int | None = None,
    body: bytes | None = None,
):
    """POST an event signed with Stripe-Signature (t=..., v1=...)."""
    body = body if body is not None else json.dumps(event).encode()
    header = payloads.sign_stripe(body, secret, timestamp or int(time.time()))
    return client.post(
        "/webhooks/stripe", data=body, content_type="application/json", headers={"Stripe-Signature": header}
    )


def post_vapi(client, message: dict, secret: str = SECRETS["vapi_webhook_secret"], hmac_auth=False):
    """POST a Vapi server message with X-Vapi-Secret, or with the HMAC credential."""
    body = json.dumps(message).encode()
    headers = payloads.vapi_hmac_headers(body, secret) if hmac_auth else {"X-Vapi-Secret": secret}
    return client.post("/webhooks/vapi", data=body, content_type="application/json", headers=headers)


def post_twilio(client, params: dict, token: str = SECRETS["twilio_auth_token"]):
    """POST a Twilio status callback form, signed over PUBLIC_BASE_URL + path."""
    url = SECRETS["public_base_url"] + TWILIO_PATH
    return client.post(
        TWILIO_PATH, data=params, headers={"X-Twilio-Signature": payloads.sign_twilio(url, params, token)}
    )


def paid_checkout(org_id, amount: int, currency: str = "usd"):
    """A paid Checkout Session and its PaymentIntent id."""
    pi = payloads.stripe_id("pi_")
    session = payloads.stripe_checkout_session(
        session_id=payloads.checkout_session_id(),
        org_id=str(org_id),
        amount_total=amount,
        currency=currency,
        payment_intent=pi,
    )
    return session, pi


def signed_stripe_body(service, size: int) -> tuple[bytes, dict]:
    """A Stripe event padded to `size` bytes, validly signed: only its size can refuse it."""
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    event = stripe_event("checkout.session.completed", session)
    event["data"]["object"]["metadata"]["padding"] = ""
    filler = size - len(json.dumps(event).encode())
    event["data"]["object"]["metadata"]["padding"] = "x" * filler
    body = json.dumps(event).encode()
    assert len(body) == size
    header = payloads.sign_stripe(body, SECRETS["stripe_webhook_secret"], int(time.time()))
    return body, {"Stripe-Signature": header, "Content-Type": "application/json"}


def chunks(body: bytes, size: int = 64 * 1024):
    """A generator body: requests sends it with Transfer-Encoding: chunked, no Content-Length."""
    for start in range(0, len(body), size):
        yield body[start : start + size]
