"""Settings from the environment (README, "Endpoints, secrets and answers"): read once, passed
explicitly."""

import os
from dataclasses import dataclass, field


def _env(name: str) -> str | None:
    """An environment variable, with empty meaning unset."""
    return os.environ.get(name) or None


@dataclass(frozen=True)
class Config:
    """Everything the shim needs from outside. A missing provider secret disables only that
    provider's endpoint (it answers 503 with a clear message); the others keep working."""

    database_url: str | None = field(default_factory=lambda: _env("DATABASE_URL"))
    port: int = field(default_factory=lambda: int(os.environ.get("PORT") or 8080))
    stripe_api_key: str | None = field(default_factory=lambda: _env("STRIPE_API_KEY"))
    stripe_webhook_secret: str | None = field(default_factory=lambda: _env("STRIPE_WEBHOOK_SECRET"))
    stripe_api_base: str | None = field(default_factory=lambda: _env("STRIPE_API_BASE"))
    vapi_api_key: str | None = field(default_factory=lambda: _env("VAPI_API_KEY"))
    vapi_webhook_secret: str | None = field(default_factory=lambda: _env("VAPI_WEBHOOK_SECRET"))
    vapi_api_base: str = field(default_factory=lambda: _env("VAPI_API_BASE") or "https://api.vapi.ai")
    # Hosts (and their subdomains) whose control URLs the shim may POST end-call to.
    vapi_control_hosts: tuple[str, ...] = field(
        default_factory=lambda: tuple(
            h.strip().lower() for h in (_env("VAPI_CONTROL_HOSTS") or "vapi.ai").split(",") if h.strip()
        )
    )
    twilio_auth_token: str | None = field(default_factory=lambda: _env("TWILIO_AUTH_TOKEN"))
    # With the auth token, the REST credentials Twilio reconciliation fetches messages with.
    twilio_account_sid: str | None = field(default_factory=lambda: _env("TWILIO_ACCOUNT_SID"))
    # None: the SDK's own https://api.twilio.com (set to a fake in tests and the demo).
    twilio_api_base: str | None = field(default_factory=lambda: _env("TWILIO_API_BASE"))
    public_base_url: str | None = field(default_factory=lambda: _env("PUBLIC_BASE_URL"))
    supabase_jwt_secret: str | None = field(default_factory=lambda: _env("SUPABASE_JWT_SECRET"))
    # The bearer token /metrics requires; unset, /metrics answers 503 (shim.metrics_auth).
    metrics_token: str | None = field(default_factory=lambda: _env("METRICS_TOKEN"))
    # Where a top-up's Checkout page sends the customer back to.
    checkout_success_url: str = field(
        default_factory=lambda: _env("CHECKOUT_SUCCESS_URL") or "https://app.example.com/billing?paid=1"
    )
    checkout_cancel_url: str = field(
        default_factory=lambda: _env("CHECKOUT_CANCEL_URL") or "https://app.example.com/billing"
    )
    pool_max_size: int = field(default_factory=lambda: int(os.environ.get("DB_POOL_MAX_SIZE") or 10))
