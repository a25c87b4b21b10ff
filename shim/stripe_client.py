"""The official Stripe client, pointed at STRIPE_API_BASE when set (the fake API in tests and
the demo). stripe-python retries network failures itself, re-sending the same Idempotency-Key
(https://docs.stripe.com/api/idempotent_requests), so a retry never creates a second object.

Its default timeout is 80 s per request: one slow Stripe then held a whole worker pass (the
jobs run one after another) and a top-up request for minutes. A request that has not answered in
STRIPE_TIMEOUT_SECONDS is given up; what it may have done is found again under its idempotency
key (a top-up's retry, the recharge claim's next lease)."""

import stripe

from shim.config import Config
from shim.http_errors import require

# (connect, read) seconds. Stripe answers a PaymentIntent confirmation in a few seconds; 20 s of
# silence is an outage, not a slow card network.
STRIPE_TIMEOUT_SECONDS = (5.0, 20.0)


def make_client(config: Config, max_network_retries: int = 2) -> stripe.StripeClient:
    """A StripeClient for this configuration, or NotConfigured when STRIPE_API_KEY is missing."""
    base_addresses = {"api": config.stripe_api_base} if config.stripe_api_base else {}
    return stripe.StripeClient(
        require(config.stripe_api_key, "STRIPE_API_KEY"),
        base_addresses=base_addresses,
        max_network_retries=max_network_retries,
        http_client=stripe.RequestsClient(timeout=STRIPE_TIMEOUT_SECONDS),
    )
