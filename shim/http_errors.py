"""How failures become HTTP answers. The rule: never 2xx for what is not committed; 503 (with
Retry-After) when the database cannot answer now, so the provider retries and nothing is lost;
4xx for what a retry of the same request cannot fix; 500 only for a defect of ours. Every answer
is JSON: {"error": <stable code>, "message": <a sentence>, "field"?: <the input at fault>}."""

import psycopg
import stripe
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from shim.signatures import BadSignature


class NotConfigured(Exception):
    """A provider's secret is missing: its endpoint is off, the others keep working."""


class BadRequest(Exception):
    """The body is not what the endpoint accepts; `field` names the input at fault, if one is."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class Unauthorized(Exception):
    """The request carries no credential, or not the one this endpoint accepts (401)."""


# A PostgreSQL error's answer: its SQLSTATE, else its class (the first two characters). An error
# the shim meets comes out of an api.* function (our own RAISEs carry 22023, 42501, P0002, PT402),
# out of a cast of a parameter the shim passed (22P02 uuid, 22003 bigint, 22P05 a \u0000 in JSON),
# or from the server's state. PostgREST's mapping is the model for the client classes
# (https://docs.postgrest.org/en/stable/references/errors.html); it answers 500 for P0002 and
# 503 only for 53, where a billing shim must also make providers retry 08, 40, 57 and a failover.
# Values: (HTTP status, error code, Retry-After seconds or None).
SQLSTATE_ANSWERS: dict[str, tuple[int, str, int | None]] = {
    # Input the client must change: data exceptions name the field when our SQL raised them.
    "22": (400, "invalid_parameter", None),
    "23503": (409, "conflict", None),
    "23505": (409, "conflict", None),
    "23": (400, "invalid_parameter", None),
    # A program limit (54001: JSON nested too deep for the server's stack) is the input's fault too.
    "54": (400, "input_too_complex", None),
    "42501": (403, "forbidden", None),
    # P0002 is raised when a record the request needs does not exist (yet): for /top-ups, the
    # caller's org has no wallet. 409, not 404: the endpoint exists and the request is well
    # formed; it conflicts with the org's current state, which opening the wallet resolves
    # (RFC 9110 15.5.10). A 404 would read as a wrong URL to clients and load balancers.
    "P0002": (409, "not_found", None),
    "PT402": (402, "insufficient_funds", None),
    # The database cannot answer now; the same request later can. 40001/40P01 are first retried
    # by shim.retry.with_connection, so they reach this table only when the retries ran out.
    "08": (503, "database_unavailable", 5),
    "28": (503, "database_unavailable", 5),  # our credentials were refused: an operator's fix
    "3D000": (503, "database_unavailable", 5),
    "40": (503, "database_busy", 1),
    "53": (503, "database_unavailable", 5),
    "55P03": (503, "database_busy", 1),
    "57": (503, "database_unavailable", 5),  # statement timeout, shutdown, crash recovery
    "58": (503, "database_unavailable", 5),
    "25006": (503, "database_unavailable", 5),  # read-only: a failover in progress
    # New code ahead of `make migrate` (a rolling deploy): /healthz says 503 too.
    "42883": (503, "schema_not_ready", 30),
    "42P01": (503, "schema_not_ready", 30),
    "3F000": (503, "schema_not_ready", 30),
}
# Anything else (0A, 21, 25, 42 but those above, P0001, XX, ...) is a defect of ours: 500.
DEFECT = (500, "internal_error", None)
# A server-side answer says what to do, never what the database said (that goes to the log).
SERVER_SIDE_MESSAGES = {
    "database_unavailable": "the database cannot answer now; retry later",
    "database_busy": "the database rolled the transaction back under contention; retry",
    "schema_not_ready": "the database schema is older than this release; retry after the migration",
    "internal_error": "internal error; it has been logged",
}


def sqlstate_answer(sqlstate: str | None) -> tuple[int, str, int | None]:
    """The deliberate answer for a SQLSTATE: exact code first, then its class."""
    if not sqlstate:
        return DEFECT
    return SQLSTATE_ANSWERS.get(sqlstate) or SQLSTATE_ANSWERS.get(sqlstate[:2]) or DEFECT


def _answer(status: int, error: str, message: str, field: str | None = None, **headers):
    body = {"error": error, "message": message}
    if field:
        body["field"] = field
    response = jsonify(body)
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
        return _answer(400, "bad_request", str(exc), exc.field)

    @app.errorhandler(Unauthorized)
    def unauthorized(exc):
        # RFC 6750 3: a protected resource answers 401 with a WWW-Authenticate challenge.
        return _answer(401, "unauthorized", str(exc), **{"WWW-Authenticate": 'Bearer realm="creditledger"'})

    @app.errorhandler(NotConfigured)
    def not_configured(exc):
        return _answer(503, "not_configured", str(exc))

    @app.errorhandler(psycopg.Error)
    def database_error(exc):
        if exc.sqlstate is None:
            return _client_side(exc)
        status, error, retry_after = sqlstate_answer(exc.sqlstate)
        headers = {"Retry-After": str(retry_after)} if retry_after else {}
        if status >= 500:
            log = app.logger.error if status == 500 else app.logger.warning
            log("database error %s answered %d: %s", exc.sqlstate, status, exc.diag.message_primary or exc)
            return _answer(status, error, SERVER_SIDE_MESSAGES[error], **headers)
        # The client's own fault: our SQL's message names the field, also in the error's COLUMN.
        return _answer(status, error, exc.diag.message_primary or str(exc), exc.diag.column_name)

    def _client_side(exc):
        """A psycopg error with no SQLSTATE never reached the server's SQL: a lost or refused
        connection (the pool's PoolTimeout included) is 503; a value psycopg cannot send (a NUL
        in a text parameter) is the input's fault."""
        if isinstance(exc, psycopg.DataError):
            return _answer(400, "invalid_parameter", str(exc))
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            app.logger.warning("database unavailable: %s", exc)
            message = SERVER_SIDE_MESSAGES["database_unavailable"]
            return _answer(503, "database_unavailable", message, **{"Retry-After": "5"})
        app.logger.error("database client error: %s", exc)
        return _answer(500, "internal_error", SERVER_SIDE_MESSAGES["internal_error"])

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

    @app.errorhandler(HTTPException)
    def http_exception(exc):
        """Werkzeug's own answers (404, 405, ...) as JSON, keeping their headers (Allow)."""
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return _answer(exc.code, exc.name.lower().replace(" ", "_"), exc.description, **headers)

    @app.errorhandler(Exception)
    def defect(exc):
        """A bug: still a JSON answer, and the traceback in the log."""
        app.logger.exception("unhandled error")
        return _answer(500, "internal_error", SERVER_SIDE_MESSAGES["internal_error"])


def require(value: str | None, name: str) -> str:
    """The value of a provider setting, or NotConfigured naming the missing variable."""
    if not value:
        raise NotConfigured(f"{name} is not set: this endpoint is disabled")
    return value
