"""POST /top-ups: one Checkout Session per request, however often it is asked for."""

import concurrent.futures
import uuid

import pytest

from shim.stripe_client import make_client
from tests.db_helpers import open_wallet
from tests.jwt_tokens import bearer, supabase_token


def top_up(client, org, amount=2500, request_id=None, token=None):
    return client.post(
        "/top-ups",
        json={"amount_minor": amount, "client_request_id": str(request_id or uuid.uuid4())},
        headers=bearer(token or supabase_token(org)),
    )


RETRIEVE_SESSION = "GET /v1/checkout/sessions/<session_id>"


def creations(fake_stripe) -> dict:
    return fake_stripe.stats()["endpoints"].get("POST /v1/checkout/sessions", {})


def test_top_up_creates_a_session_for_the_callers_org(client, service, db, fake_stripe):
    org = open_wallet(service)
    answer = top_up(client, org)
    assert answer.status_code == 200
    assert answer.json["status"] == "created"
    assert answer.json["session_id"].startswith("cs_")
    assert answer.json["checkout_url"].startswith("https://")
    row = db.execute("SELECT * FROM billing.checkout_requests").fetchone()
    assert row["org_id"] == org and row["session_id"] == answer.json["session_id"]
    assert creations(fake_stripe)["created"] == 1


def test_ten_concurrent_requests_make_one_session_and_one_stripe_create(shim_app, service, fake_stripe):
    org = open_wallet(service)
    request_id = uuid.uuid4()
    token = supabase_token(org)

    def ask(_):
        return top_up(shim_app.test_client(), org, request_id=request_id, token=token)

    with concurrent.futures.ThreadPoolExecutor(max_workers=10) as pool:
        answers = list(pool.map(ask, range(10)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json["session_id"] for a in answers}) == 1
    assert sorted(a.json["status"] for a in answers).count("created") == 1
    assert creations(fake_stripe)["calls"] == 1


def test_double_click_with_a_new_request_id_gets_the_same_session(client, service, fake_stripe):
    org = open_wallet(service)
    first = top_up(client, org, amount=5000)
    second = top_up(client, org, amount=5000)
    assert second.json == dict(first.json, status="existing")
    assert creations(fake_stripe)["created"] == 1


def test_retry_after_a_timeout_reuses_the_idempotency_key(client, service, db, fake_stripe):
    """The first request's lease holder died after Stripe created the session (we simulate a
    lost answer by creating it with the request's key directly); the retry, once the lease
    expired, sends the same key and Stripe replays the same session."""
    org = open_wallet(service)
    request_id = uuid.uuid4()
    token = supabase_token(org)
    fake_stripe.control("fail", {"count": 1, "status": 500, "path_prefix": "/v1/checkout"})
    first = top_up(client, org, request_id=request_id, token=token)
    assert first.status_code == 200  # stripe-python retried the 500 with the same key
    assert creations(fake_stripe)["created"] == 1

    db.execute(
        "UPDATE billing.checkout_requests SET status = 'creating', session_id = NULL, "
        "checkout_url = NULL, lease_until = now() - interval '1 second'"
    )
    again = top_up(client, org, request_id=request_id, token=token)
    assert again.json["session_id"] == first.json["session_id"]
    assert creations(fake_stripe)["created"] == 1
    assert creations(fake_stripe)["replayed"] >= 1


@pytest.mark.parametrize("amount", [0, 499, 500_001])
def test_amount_outside_the_operators_bounds_is_400(client, service, db, amount):
    org = open_wallet(service)
    answer = top_up(client, org, amount=amount)
    assert answer.status_code == 400 and answer.json["error"] == "invalid_parameter"
    assert db.execute("SELECT count(*) AS n FROM billing.checkout_requests").fetchone()["n"] == 0


def test_same_request_id_for_another_amount_is_409(client, service):
    org = open_wallet(service)
    request_id = uuid.uuid4()
    assert top_up(client, org, 2500, request_id).status_code == 200
    assert top_up(client, org, 9900, request_id).status_code == 409


@pytest.mark.parametrize("problem", ["missing", "expired", "tampered", "wrong_secret"])
def test_bad_tokens_are_401(client, service, db, problem):
    org = open_wallet(service)
    token = {
        "missing": None,
        "expired": supabase_token(org, expires_in=-10),
        "tampered": supabase_token(org)[:-4] + "AAAA",
        "wrong_secret": supabase_token(org, secret="another-secret-of-at-least-32-bytes!"),
    }[problem]
    headers = bearer(token) if token else {}
    answer = client.post(
        "/top-ups", json={"amount_minor": 2500, "client_request_id": str(uuid.uuid4())}, headers=headers
    )
    assert answer.status_code == 401
    assert db.execute("SELECT count(*) AS n FROM billing.checkout_requests").fetchone()["n"] == 0


def test_member_of_another_org_tops_up_only_its_own(client, service, db):
    mine, theirs = open_wallet(service), open_wallet(service)
    answer = top_up(client, mine, token=supabase_token(mine, org_role="member"))
    assert answer.status_code == 200
    orgs = {r["org_id"] for r in db.execute("SELECT org_id FROM billing.checkout_requests").fetchall()}
    assert orgs == {mine} and theirs not in orgs


def test_paid_session_credits_once_through_the_webhook(client, service, db, stripe_delivers):
    org = open_wallet(service)
    answer = top_up(client, org, amount=2500)
    stripe_delivers.control(f"complete_session/{answer.json['session_id']}")
    wallet = db.execute("SELECT balance_minor FROM billing.wallets WHERE org_id = %s", (org,)).fetchone()
    assert wallet["balance_minor"] == 2500  # checkout.session.completed + payment_intent.succeeded
    assert db.execute("SELECT status FROM billing.checkout_requests").fetchone()["status"] == "completed"
    again = top_up(client, org, amount=2500)
    assert again.json["status"] == "created"  # a completed session is not offered again


def session_lapses(db, stripe_client, session_id, *, at_stripe: bool):
    """The session's expires_at passes on our clock; with at_stripe, Stripe expired it too."""
    db.execute("UPDATE billing.checkout_requests SET session_expires_at = now() - interval '1 second'")
    if at_stripe:
        stripe_client.v1.checkout.sessions.expire(session_id)


def test_expired_session_gets_a_new_attempt_under_a_new_key(client, service, db, fake_stripe, shim_config):
    """A session that expired unpaid (Stripe says so) is not offered again: the same request
    gets a new session, created under a new idempotency key (attempt 2)."""
    org = open_wallet(service)
    request_id = uuid.uuid4()
    token = supabase_token(org)
    first = top_up(client, org, request_id=request_id, token=token)
    session_lapses(db, make_client(shim_config), first.json["session_id"], at_stripe=True)
    second = top_up(client, org, request_id=request_id, token=token)
    assert second.status_code == 200 and second.json["status"] == "created"
    assert second.json["session_id"] != first.json["session_id"]
    row = db.execute("SELECT attempt, idempotency_key, status FROM billing.checkout_requests").fetchone()
    assert row["attempt"] == 2 and row["idempotency_key"].endswith("-2") and row["status"] == "open"
    assert creations(fake_stripe)["created"] == 2
    third = top_up(client, org, request_id=request_id, token=token)
    assert third.json == dict(second.json, status="existing")


@pytest.mark.parametrize("at_stripe", ["complete", "open"])
def test_session_paid_or_open_at_stripe_past_our_expiry_is_not_replaced(
    client, service, db, fake_stripe, shim_config, at_stripe
):
    """F-9: the customer paid in the session's last moments and its webhook has not arrived (or
    our clock runs ahead of Stripe's). Retrying the same request must not offer a second
    payment: Stripe is asked, and the same session stands; nothing is created."""
    org = open_wallet(service)
    request_id = uuid.uuid4()
    token = supabase_token(org)
    first = top_up(client, org, request_id=request_id, token=token)
    if at_stripe == "complete":
        fake_stripe.control(f"complete_session/{first.json['session_id']}")  # webhook not delivered
    session_lapses(db, make_client(shim_config), first.json["session_id"], at_stripe=False)

    again = top_up(client, org, request_id=request_id, token=token)
    assert again.status_code == 200 and again.json == dict(first.json, status="existing")
    endpoints = fake_stripe.stats()["endpoints"]
    assert endpoints[RETRIEVE_SESSION]["calls"] == 1  # Stripe was asked
    assert creations(fake_stripe)["calls"] == 1
    row = db.execute("SELECT attempt, status FROM billing.checkout_requests").fetchone()
    assert (row["attempt"], row["status"]) == (1, "open")


def test_a_paid_request_is_never_offered_again_even_after_its_expiry(
    client, service, db, stripe_delivers, shim_config
):
    """A completed request answers with its session for good: no new attempt, no Stripe call."""
    org = open_wallet(service)
    request_id = uuid.uuid4()
    token = supabase_token(org)
    first = top_up(client, org, request_id=request_id, token=token)
    stripe_delivers.control(f"complete_session/{first.json['session_id']}")
    assert db.execute("SELECT status FROM billing.checkout_requests").fetchone()["status"] == "completed"
    db.execute("UPDATE billing.checkout_requests SET session_expires_at = now() - interval '1 second'")
    again = top_up(client, org, request_id=request_id, token=token)
    assert again.json == dict(first.json, status="existing")
    endpoints = stripe_delivers.stats()["endpoints"]
    assert endpoints["POST /v1/checkout/sessions"]["calls"] == 1
    assert RETRIEVE_SESSION not in endpoints


def test_stripe_unreachable_while_checking_an_expired_session_is_503_and_changes_nothing(
    client, service, db, fake_stripe, shim_config, monkeypatch
):
    import shim.topups

    org = open_wallet(service)
    request_id = uuid.uuid4()
    token = supabase_token(org)
    first = top_up(client, org, request_id=request_id, token=token)
    session_lapses(db, make_client(shim_config), first.json["session_id"], at_stripe=True)
    real = shim.topups.make_client
    monkeypatch.setattr(shim.topups, "make_client", lambda config: real(config, max_network_retries=0))
    fake_stripe.control("fail", {"count": 1, "status": 500, "path_prefix": "/v1/checkout"})
    outage = top_up(client, org, request_id=request_id, token=token)
    assert outage.status_code == 503
    row = db.execute("SELECT attempt, status, session_id FROM billing.checkout_requests").fetchone()
    assert (row["attempt"], row["status"], row["session_id"]) == (1, "open", first.json["session_id"])
    retry = top_up(client, org, request_id=request_id, token=token)
    assert retry.json["status"] == "created" and retry.json["session_id"] != first.json["session_id"]


def test_stripe_unreachable_is_503_and_the_retry_gets_one_session(client, service, fake_stripe, monkeypatch):
    """Stripe fails the create: the customer gets a 503 to retry, the lease is given back at
    once, and the retry creates the one session under the same key."""
    import shim.topups

    org = open_wallet(service)
    request_id = uuid.uuid4()
    real = shim.topups.make_client
    monkeypatch.setattr(shim.topups, "make_client", lambda config: real(config, max_network_retries=0))
    fake_stripe.control("fail", {"count": 1, "status": 500, "path_prefix": "/v1/checkout"})
    outage = top_up(client, org, request_id=request_id)
    assert outage.status_code == 503 and outage.headers["Retry-After"]
    retried = top_up(client, org, request_id=request_id)
    assert retried.status_code == 200 and retried.json["status"] == "created"
    assert creations(fake_stripe)["created"] == 1
