"""How failures become HTTP answers. The rule: never 2xx for what is not committed; 503 when the
database is unreachable so the provider retries; 400 for what a retry cannot fix."""

import psycopg
import stripe
from flask import Flask, jsonify
from psycopg_pool import PoolTimeout

from shim.signatures import BadSignature


class NotConfigured(Exception):
    """A provider's secret is missing: its endpoint is off, the others keep working."""


class BadRequest(Exception):
    """The body is not what the endpoint accepts."""


def _answer(status: int, error: str, message: str, **headers):
    response = jsonify({"error": error, "message": message})
    response.status_code = status
    response.headers.update(headers)
    return response


def register(app: Flask) -> None:
    """Install the error handlers on the app."""

    @app.errorhandler(BadSignature)
    def bad_signature(exc):
        return _answer(400, "bad_signature", str(exc))

    @app.errorhandler(BadRequest)
    def bad_request(exc):
        return _answer(400, "bad_request", str(exc))

    @app.errorhandler(NotConfigured)
    def not_configured(exc):
        return _answer(503, "not_configured", str(exc))

    @app.errorhandler(PoolTimeout)
    @app.errorhandler(psycopg.OperationalError)
    def database_unavailable(exc):
        app.logger.warning("database unavailable: %s", exc)
        return _answer(
            503, "database_unavailable", "the database is unreachable; retry later", **{"Retry-After": "5"}
        )

    @app.errorhandler(psycopg.errors.InvalidParameterValue)
    def invalid_parameter(exc):
        return _answer(400, "invalid_parameter", exc.diag.message_primary or str(exc))

    @app.errorhandler(psycopg.errors.InsufficientPrivilege)
    def forbidden(exc):
        return _answer(403, "forbidden", exc.diag.message_primary or str(exc))

    @app.errorhandler(stripe.APIConnectionError)
    @app.errorhandler(stripe.RateLimitError)
    @app.errorhandler(stripe.APIError)
    def stripe_unavailable(exc):
        # Nothing was recorded as created; the request's key makes the retry safe.
        return _answer(503, "stripe_unavailable", "Stripe did not answer; retry", **{"Retry-After": "2"})

    @app.errorhandler(stripe.StripeError)
    def stripe_refused(exc):
        app.logger.error("Stripe refused a request: %s", exc)
        return _answer(502, "stripe_error", exc.user_message or "Stripe refused the request")

    @app.errorhandler(413)
    def too_large(exc):
        return _answer(413, "payload_too_large", "bodies over 1 MiB are refused")


def require(value: str | None, name: str) -> str:
    """The value of a provider setting, or NotConfigured naming the missing variable."""
    if not value:
        raise NotConfigured(f"{name} is not set: this endpoint is disabled")
    return value
