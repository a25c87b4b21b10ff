"""A signature is only as fresh as its timestamp: Stripe's and Vapi's timestamped signatures are
refused when the timestamp is not a finite number or lies more than the tolerance (300 s) away
from our clock, in the past or in the future, and nothing is stored."""

import json
import time

import pytest

from shim.fakes import payloads
from shim.signatures import TOLERANCE_SECONDS
from tests.conftest import SECRETS
from tests.db_helpers import open_wallet, route_assistant
from tests.senders import paid_checkout, post_stripe, stripe_event


def inbox_size(db) -> int:
    return db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"]


def post_vapi_hmac(client, body: bytes, timestamp: str):
    headers = payloads.vapi_hmac_headers(body, SECRETS["vapi_webhook_secret"], timestamp=timestamp)
    return client.post("/webhooks/vapi", data=body, content_type="application/json", headers=headers)


def vapi_body(service) -> bytes:
    org = open_wallet(service, balance_minor=10_000)
    call = payloads.vapi_call(assistant_id=route_assistant(service, org), status="in-progress")
    return json.dumps(payloads.vapi_status_update(call, "in-progress")).encode()


@pytest.mark.parametrize("timestamp", ["nan", "NaN", "-nan", "inf", "-inf", "1e400", "infinity"])
def test_vapi_hmac_with_a_non_finite_timestamp_is_400(client, service, db, timestamp):
    """float('nan') parses, and `abs(now - nan) > tolerance` is false: NaN passed as fresh, for
    ever. The HMAC here is valid over the timestamp as sent: only the timestamp is wrong."""
    answer = post_vapi_hmac(client, vapi_body(service), timestamp)
    assert answer.status_code == 400 and answer.json["error"] == "bad_signature"
    assert inbox_size(db) == 0


@pytest.mark.parametrize("ahead", [TOLERANCE_SECONDS + 5, 3600, 10 * 365 * 86400])
def test_vapi_hmac_timestamped_in_the_future_is_400(client, service, db, ahead):
    future_ms = int((time.time() + ahead) * 1000)
    answer = post_vapi_hmac(client, vapi_body(service), str(future_ms))
    assert answer.status_code == 400 and answer.json["error"] == "bad_signature"
    assert inbox_size(db) == 0


def test_vapi_hmac_within_the_clock_skew_is_accepted(client, service, db):
    """The window is symmetric: a sender a little ahead of our clock is still believed."""
    soon_ms = int((time.time() + TOLERANCE_SECONDS - 30) * 1000)
    assert post_vapi_hmac(client, vapi_body(service), str(soon_ms)).status_code == 200
    assert inbox_size(db) == 1


@pytest.mark.parametrize("ahead", [TOLERANCE_SECONDS + 5, 3600, 10 * 365 * 86400])
def test_stripe_signature_timestamped_in_the_future_is_400(client, service, db, ahead):
    """stripe-python's verify_header only refuses timestamps older than the tolerance."""
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    answer = post_stripe(
        client, stripe_event("checkout.session.completed", session), timestamp=int(time.time()) + ahead
    )
    assert answer.status_code == 400 and answer.json["error"] == "bad_signature"
    assert inbox_size(db) == 0


def test_stripe_header_with_a_second_future_timestamp_is_400(client, service, db):
    """stripe-python signs over the first t=; a second one in the future is refused too, so no
    header can be read one way by stripe-python and another way here."""
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    body = json.dumps(stripe_event("checkout.session.completed", session)).encode()
    header = payloads.sign_stripe(body, SECRETS["stripe_webhook_secret"], int(time.time()))
    header += f",t={int(time.time()) + 3600}"
    answer = client.post(
        "/webhooks/stripe", data=body, content_type="application/json", headers={"Stripe-Signature": header}
    )
    assert answer.status_code == 400 and answer.json["error"] == "bad_signature"
    assert inbox_size(db) == 0


def test_stripe_signature_within_the_clock_skew_is_accepted(client, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    soon = int(time.time()) + TOLERANCE_SECONDS - 30
    assert (
        post_stripe(client, stripe_event("checkout.session.completed", session), timestamp=soon).status_code
        == 200
    )
    assert inbox_size(db) == 1
