"""The shim under gunicorn on loopback: many concurrent deliveries of one event credit once."""

import concurrent.futures
import json
import time

import pytest
import requests

from shim.body_limit import MAX_BODY_BYTES
from shim.fakes import payloads
from tests.conftest import SECRETS
from tests.db_helpers import ledger_count, open_wallet, wallet
from tests.gunicorn_server import running_gunicorn
from tests.senders import METRICS_AUTH, chunks, paid_checkout, signed_stripe_body, stripe_event


@pytest.fixture
def gunicorn_url(db_url, tmp_path):
    """gunicorn serving the app on 127.0.0.1, stopped after the test."""
    with running_gunicorn(db_url, tmp_path) as url:
        yield url


def test_concurrent_deliveries_of_one_event_credit_once(gunicorn_url, service, db):
    org = open_wallet(service)
    session, _ = paid_checkout(org, 2500)
    body = json.dumps(stripe_event("checkout.session.completed", session)).encode()

    def deliver(_):
        header = payloads.sign_stripe(body, SECRETS["stripe_webhook_secret"], int(time.time()))
        return requests.post(
            f"{gunicorn_url}/webhooks/stripe",
            data=body,
            timeout=30,
            headers={"Stripe-Signature": header, "Content-Type": "application/json"},
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(deliver, range(32)))
    assert {a.status_code for a in answers} == {200}
    statuses = sorted(a.json()["status"] for a in answers)
    assert statuses.count("processed") == 1 and statuses.count("duplicate") == 31
    assert wallet(db, org)["balance_minor"] == 2500
    assert ledger_count(db, org) == 1


def test_metrics_count_requests_of_every_worker(gunicorn_url):
    """Two workers answer; whichever serves the scrape reports the requests of both."""
    for _ in range(12):
        requests.post(f"{gunicorn_url}/webhooks/stripe", data=b"{}", timeout=10)
    text = requests.get(f"{gunicorn_url}/metrics", headers=METRICS_AUTH, timeout=10).text
    assert 'creditledger_http_requests_total{code="400",endpoint="/webhooks/stripe"} 12.0' in text
    assert "creditledger_database_up 1.0" in text


def test_a_chunked_body_over_one_mib_is_413_under_gunicorn(gunicorn_url, service, db):
    """gunicorn decodes chunked input and sets wsgi.input_terminated; the shim reads at most one
    byte past the limit, so one byte too many is 413 and exactly 1 MiB still applies."""
    too_long, headers = signed_stripe_body(service, MAX_BODY_BYTES + 1)
    answer = requests.post(
        f"{gunicorn_url}/webhooks/stripe", data=chunks(too_long), headers=headers, timeout=30
    )
    assert answer.status_code == 413 and answer.json()["error"] == "payload_too_large"
    assert db.execute("SELECT count(*) AS n FROM billing.webhook_events").fetchone()["n"] == 0

    exact, headers = signed_stripe_body(service, MAX_BODY_BYTES)
    answer = requests.post(f"{gunicorn_url}/webhooks/stripe", data=chunks(exact), headers=headers, timeout=30)
    assert answer.status_code == 200 and answer.json()["status"] == "processed"
