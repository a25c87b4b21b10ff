"""413 for any body over 1 MiB, with or without a Content-Length, over real HTTP (Werkzeug's
threaded server here; gunicorn in tests/test_gunicorn.py). A chunked body used to be cut at
1 MiB without an error and answered 400 bad_signature; now it is refused and nothing is stored."""

import io
from urllib.parse import urlencode

import pytest
import requests

from shim.body_limit import MAX_BODY_BYTES
from shim.fakes import payloads
from tests.conftest import SECRETS
from tests.db_helpers import open_wallet
from tests.senders import TWILIO_PATH, chunks, signed_stripe_body


def inbox_size(db) -> int:
    return db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"]


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_signed_body_over_one_mib_is_413_over_http(shim_url, service, db, chunked):
    body, headers = signed_stripe_body(service, MAX_BODY_BYTES + 1)
    data = chunks(body) if chunked else body
    answer = requests.post(f"{shim_url}/webhooks/stripe", data=data, headers=headers, timeout=30)
    assert answer.status_code == 413
    assert answer.json()["error"] == "payload_too_large"
    assert inbox_size(db) == 0


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_signed_body_of_exactly_one_mib_is_accepted_over_http(shim_url, service, db, chunked):
    body, headers = signed_stripe_body(service, MAX_BODY_BYTES)
    data = chunks(body) if chunked else body
    answer = requests.post(f"{shim_url}/webhooks/stripe", data=data, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    assert inbox_size(db) == 1


def test_a_chunked_twilio_form_over_one_mib_is_413(shim_url):
    """Form bodies too: the limit is checked before any view or form parser reads the body."""
    form = b"MessageSid=SM1&MessageStatus=delivered&Body=" + b"x" * MAX_BODY_BYTES
    answer = requests.post(
        f"{shim_url}/webhooks/twilio/sms-status",
        data=chunks(form),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": "x"},
        timeout=30,
    )
    assert answer.status_code == 413


def test_a_chunked_twilio_form_under_the_limit_is_parsed(shim_url, service, db):
    """The body read before the view is cached: the form parser gets it whole, signature and all."""
    org = open_wallet(service, balance_minor=100)
    sid = payloads.twilio_sid("SM")
    service.execute("SELECT * FROM api.register_sms(%s, %s, 1)", (org, sid))
    form = payloads.twilio_status_callback(
        message_sid=sid,
        status="delivered",
        account_sid="AC" + "0" * 32,
        from_="+15550000001",
        to="+15550000002",
    )
    signature = payloads.sign_twilio(
        SECRETS["public_base_url"] + TWILIO_PATH, form, SECRETS["twilio_auth_token"]
    )
    answer = requests.post(
        f"{shim_url}{TWILIO_PATH}",
        data=chunks(urlencode(form).encode(), size=16),
        headers={"Content-Type": "application/x-www-form-urlencoded", "X-Twilio-Signature": signature},
        timeout=30,
    )
    assert answer.status_code == 200 and answer.json()["result"]["status"] == "applied"


def test_an_unterminated_stream_without_length_is_refused_not_read(client):
    """A server that does not terminate chunked input (no wsgi.input_terminated) gives the view
    no body (Werkzeug's safe fallback), and the signature check refuses it: never a hang."""
    answer = client.post(
        "/webhooks/stripe",
        input_stream=io.BytesIO(b"x" * (2 * MAX_BODY_BYTES)),
        headers={"Stripe-Signature": "t=1,v1=00", "Transfer-Encoding": "chunked"},
    )
    assert answer.status_code == 400 and answer.json["error"] == "bad_signature"
