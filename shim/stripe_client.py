"""The official Stripe client, pointed at STRIPE_API_BASE when set (the fake API in tests and
the demo). stripe-python retries network failures itself, re-sending the same Idempotency-Key
(https://docs.stripe.com/api/idempotent_requests), so a retry never creates a second object."""

import stripe

from shim.config import Config
from shim.http_errors import require


def make_client(config: Config, max_network_retries: int = 2) -> stripe.StripeClient:
    """A StripeClient for this configuration, or NotConfigured when STRIPE_API_KEY is missing."""
    base_addresses = {"api": config.stripe_api_base} if config.stripe_api_base else {}
    return stripe.StripeClient(
        require(config.stripe_api_key, "STRIPE_API_KEY"),
        base_addresses=base_addresses,
        max_network_retries=max_network_retries,
    )
