"""Auto-recharge: turn pending claims (taken in SQL) into off-session PaymentIntents.

Each claim carries its own idempotency key, so a worker that crashes after Stripe accepted the
charge and before recording it charges nothing twice: the next pass sends the same key and
Stripe replays the first answer (https://docs.stripe.com/api/idempotent_requests). What an
answer means for the ledger is decided in SQL (api.record_recharge_result), exactly as when the
payment_intent.succeeded / payment_failed webhook reports it first.

Stripe may prune a key once it is 24 hours old, and then "a new request" is made with it
(https://docs.stripe.com/idempotency). So a claim sent again (a later lease of the same claim)
first looks for the PaymentIntent an earlier attempt may have created and never recorded, and
records that one instead of creating a second."""

import logging
from datetime import timedelta

import stripe

from shim.queries import QUERIES

log = logging.getLogger(__name__)


# PaymentIntent statuses that end a claim as failed, with the code recorded when Stripe gave none.
FAILURE_CODES = {
    "requires_action": "authentication_required",
    "requires_payment_method": "authentication_required",
    "canceled": "canceled",
}
# Stripe's clock and ours may differ: look a little before the claim was taken.
CLOCK_SKEW = timedelta(minutes=5)


def earlier_intent(client: stripe.StripeClient, claim: dict):
    """The PaymentIntent an earlier attempt of this claim created, or None (always None on the
    first attempt), looked for under every customer the claim was sent under (the wallet's
    customer may have changed since). Listed, not searched: the list API is read-after-write
    consistent, where search may lag (https://docs.stripe.com/search#data-freshness)."""
    if claim["attempts"] <= 1:
        return None
    for customer in claim["sent_to_customers"]:
        page = client.v1.payment_intents.list(
            params={
                "customer": customer,
                "created": {"gte": int((claim["created_at"] - CLOCK_SKEW).timestamp())},
                "limit": 100,
            }
        )
        for intent in page.auto_paging_iter():
            if intent.metadata.to_dict().get("recharge_claim_id") == str(claim["claim_id"]):
                return intent
    return None


def charge_claim(client: stripe.StripeClient, claim: dict) -> dict:
    """Charge one claim's saved card off-session; return what to record (an outcome of
    succeeded, failed or processing), or None when Stripe could not be reached (the claim's
    lease expires and it is retried with the same key)."""
    recorded = {
        "claim_id": claim["claim_id"],
        "payment_intent_id": None,
        "amount_minor": None,
        "currency": None,
        "failure_code": None,
    }
    try:
        intent = earlier_intent(client, claim) or client.v1.payment_intents.create(
            params={
                "amount": claim["amount_minor"],
                "currency": claim["currency"],
                "customer": claim["stripe_customer_id"],
                "payment_method": claim["stripe_payment_method_id"],
                "off_session": True,
                "confirm": True,
                "description": "Automatic credit recharge",
                "metadata": {"org_id": str(claim["org_id"]), "recharge_claim_id": str(claim["claim_id"])},
            },
            options={"idempotency_key": claim["idempotency_key"]},
        )
    except stripe.CardError as exc:
        # A decline (card_declined, authentication_required, ...): the claim fails and cools down.
        error = exc.error
        intent_id = error.payment_intent.id if error and error.payment_intent else None
        return recorded | {
            "outcome": "failed",
            "payment_intent_id": intent_id,
            "failure_code": exc.code or "card_error",
        }
    except (stripe.RateLimitError, stripe.APIConnectionError, stripe.APIError) as exc:
        log.warning(
            "recharge claim %s: Stripe unavailable (%s); retried after its lease", claim["claim_id"], exc
        )
        return None
    except (stripe.InvalidRequestError, stripe.IdempotencyError) as exc:
        # e.g. the saved card changed since the key was first used: this claim cannot be sent
        # again as it is; it fails (with its cooldown) and the next claim carries a new key.
        return recorded | {"outcome": "failed", "failure_code": exc.code or "invalid_request"}

    if intent.status == "succeeded":
        return recorded | {
            "outcome": "succeeded",
            "payment_intent_id": intent.id,
            "amount_minor": intent.amount_received or intent.amount,
            "currency": intent.currency,
        }
    if intent.status in FAILURE_CODES:
        # An earlier attempt's decline, found by earlier_intent, keeps its own code.
        error = intent.last_payment_error
        return recorded | {
            "outcome": "failed",
            "payment_intent_id": intent.id,
            "failure_code": (error.code if error else None) or FAILURE_CODES[intent.status],
        }
    # processing (a bank debit): remembered on the claim, settled by the payment_intent.* webhook.
    return recorded | {"outcome": "processing", "payment_intent_id": intent.id}


def process_claims(pool, client: stripe.StripeClient, max_claims: int = 20) -> dict:
    """One pass: lease due claims, charge each, record each answer. Returns counts."""
    counts = {"leased": 0, "succeeded": 0, "failed": 0, "processing": 0, "deferred": 0}
    with pool.connection() as conn:
        claims = conn.execute(QUERIES["lease_recharge_claims"], {"max_claims": max_claims}).fetchall()
    for claim in claims:
        counts["leased"] += 1
        recorded = charge_claim(client, claim)
        if recorded is None:
            counts["deferred"] += 1
            continue
        with pool.connection() as conn:
            if recorded["outcome"] == "processing":
                conn.execute(QUERIES["mark_recharge_processing"], recorded)
            else:
                conn.execute(QUERIES["record_recharge_result"], recorded)
        counts[recorded["outcome"]] += 1
    return counts
