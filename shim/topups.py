"""POST /top-ups: a signed-in user asks for a Checkout Session. One SQL call, made as that user,
decides whether a session for this request exists (return it) or may be created (then Stripe is
called with the request's deterministic idempotency key): a double click, a retry and two tabs
produce one session."""

import json
import time

import stripe
from flask import Blueprint, current_app, jsonify

from shim.http_errors import require
from shim.inputs import bigint_field, caller_claims, json_object_body, uuid_field
from shim.queries import QUERIES
from shim.retry import with_connection
from shim.signatures import verify_supabase_jwt
from shim.stripe_client import make_client

bp = Blueprint("topups", __name__)

# While another request holds the creation lease, ask again this often, for at most this long.
PENDING_POLL_SECONDS = 0.05
PENDING_WAIT_SECONDS = 10.0


def parse_body() -> tuple[int, str]:
    """amount_minor (a bigint; its bounds are SQL's) and client_request_id (a uuid), or 400."""
    body = json_object_body()
    return bigint_field(body, "amount_minor"), uuid_field(body, "client_request_id")


def decide(pool, claims: dict, amount: int, client_request_id: str) -> dict:
    """api.begin_checkout as the user, waiting while another request holds the lease."""
    deadline = time.monotonic() + PENDING_WAIT_SECONDS

    def as_user(conn):
        with conn.transaction():
            conn.execute(QUERIES["become_user"], {"claims": json.dumps(claims)})
            return conn.execute(
                QUERIES["begin_checkout"],
                {"amount_minor": amount, "client_request_id": client_request_id},
            ).fetchone()["answer"]

    while True:
        answer = with_connection(pool, as_user)
        if answer["status"] != "pending" or time.monotonic() > deadline:
            return answer
        time.sleep(PENDING_POLL_SECONDS)


def session_expired_unpaid(config, pool, answer: dict) -> bool:
    """Our clock says the request's session expired, and no payment was seen. Stripe decides:
    a session the customer completed at the last moment (its webhook still on its way) or that
    is still open stands, so the customer is never offered a second payment for one request.
    Only an `expired` session is marked so here, which lets the next decision start attempt 2."""
    session = make_client(config).v1.checkout.sessions.retrieve(answer["session_id"])
    if session.status != "expired":
        return False
    with pool.connection() as conn:
        conn.execute(
            QUERIES["mark_checkout_expired"],
            {"request_id": answer["request_id"], "session_id": answer["session_id"]},
        )
    return True


def create_session(config, answer: dict):
    """Create the Checkout Session; the amount and the key come from SQL's answer."""
    metadata = {"org_id": answer["org_id"], "checkout_request_id": str(answer["request_id"])}
    return make_client(config).v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "client_reference_id": answer["org_id"],
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": answer["currency"],
                        "unit_amount": answer["amount_minor"],
                        "product_data": {"name": "Voice AI credit"},
                    },
                }
            ],
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata},
            "success_url": config.checkout_success_url,
            "cancel_url": config.checkout_cancel_url,
        },
        options={"idempotency_key": answer["idempotency_key"]},
    )


@bp.post("/top-ups")
def create_top_up():
    """Answer {checkout_url, session_id, status: created | existing}."""
    config = current_app.config["CREDITLEDGER"]
    claims = caller_claims(config, verify_supabase_jwt)
    amount, client_request_id = parse_body()
    require(config.stripe_api_key, "STRIPE_API_KEY")
    pool = current_app.extensions["creditledger.pool"]

    answer = decide(pool, claims, amount, client_request_id)
    if answer["status"] == "verify":
        if session_expired_unpaid(config, pool, answer):
            answer = decide(pool, claims, amount, client_request_id)
        else:
            answer["status"] = "existing"
    status = "existing"
    if answer["status"] == "conflict":
        return jsonify({"error": "conflict", "message": "client_request_id was used for another amount"}), 409
    if answer["status"] == "pending":
        return jsonify({"error": "in_progress", "message": "the session is being created; retry"}), 503
    if answer["status"] == "create":
        try:
            session = create_session(config, answer)
        except stripe.StripeError:
            with pool.connection() as conn:
                conn.execute(QUERIES["release_checkout_lease"], {"request_id": answer["request_id"]})
            raise  # answered 503 (unreachable) or 502 (refused) by shim.http_errors
        with pool.connection() as conn:
            answer = conn.execute(
                QUERIES["record_checkout_session"],
                {
                    "request_id": answer["request_id"],
                    "session_id": session.id,
                    "checkout_url": session.url,
                    "expires_at": session.expires_at,
                },
            ).fetchone()["answer"]
        status = "created"
    return jsonify(
        {"checkout_url": answer["checkout_url"], "session_id": answer["session_id"], "status": status}
    ), 200
