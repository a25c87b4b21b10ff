"""Who may read /metrics: the holder of METRICS_TOKEN, nobody else.

The health numbers are not public: they show suspended wallets, failing providers and open
discrepancies, and each scrape queries the database. With METRICS_TOKEN unset, /metrics answers
503 not_configured, like a provider endpoint without its secret (README, Endpoints): a
billing system never serves them to anyone by default, and the operator sees at once why the
scrape fails (the target is down in Prometheus, BillingMetricsAbsent fires) instead of finding
out later that the numbers were open. There is no opt-out: a private network is no reason to
skip a shared secret that Prometheus sends with one line of configuration."""

import hmac

from shim.http_errors import Unauthorized, require


def require_metrics_token(token: str | None, authorization: str | None) -> None:
    """Pass when `Authorization: Bearer <token>` carries the configured token; else 503 when no
    token is configured, 401 otherwise. The comparison takes the same time wherever the tokens
    differ (hmac.compare_digest, on bytes: on str it refuses non-ASCII with TypeError)."""
    expected = require(token, "METRICS_TOKEN").encode()
    scheme, _, offered = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered.strip().encode(), expected):
        raise Unauthorized("/metrics requires Authorization: Bearer <METRICS_TOKEN>")
