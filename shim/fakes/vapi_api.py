"""Fake of Vapi's call-listing API (GET /call, GET /call/:id), so the usage poller can be tested
against the real query contract: Bearer auth, `limit` (default 100, at most 1000), the
createdAt/updatedAt Gt/Lt/Ge/Le filters, `id`, `assistantId`, `phoneNumberId`, and a plain JSON
array sorted by createdAt descending with no cursor (Vapi server SDK `ListCallsRequest`).

Errors follow Vapi's NestJS shape: {"message", "error", "statusCode"}.

Control API (JSON):
POST /_control/calls   [call, ...]  add or replace calls by id (build them with vapi_call)
POST /_control/fail    {"count": n, "status": 429}  next n API requests get that status
                       (429 carries `Retry-After: 0`)
GET  /_control/stats   {"requests", "injected_failures", "unauthorized", "queries": [...]}
POST /_control/reset
"""

import operator
import threading
from datetime import UTC, datetime

from flask import Flask, request

from shim.fakes.outages import Outages

_DATE_FILTERS = {
    f"{field}{op}": (field, op) for field in ("createdAt", "updatedAt") for op in ("Gt", "Lt", "Ge", "Le")
}
_COMPARE = {"Gt": operator.gt, "Lt": operator.lt, "Ge": operator.ge, "Le": operator.le}
_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class _VapiError(Exception):
    """An error response in Vapi's NestJS shape."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.body = {"message": message, "error": _REASONS.get(status, "Error"), "statusCode": status}
        self.headers = headers or {}


def _parse_time(value, name):
    """Parse an ISO-8601 filter value (UTC when no offset); Vapi rejects others with 400."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise _VapiError(400, [f"{name} must be a valid ISO 8601 date string"]) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _limit(raw):
    """Validate `limit` like Vapi's DTO: a number from 0 to 1000, default 100."""
    if raw is None:
        return 100
    try:
        limit = float(raw)
    except ValueError:
        raise _VapiError(400, ["limit must be a number conforming to the specified constraints"]) from None
    if limit > 1000:
        raise _VapiError(400, ["limit must not be greater than 1000"])
    if not limit >= 0:  # also catches NaN
        raise _VapiError(400, ["limit must not be less than 0"])
    return int(limit)


def _call_filter(args):
    """Validate the query's filters up front and return a predicate over calls."""
    equal = {name: args[name] for name in ("id", "assistantId", "phoneNumberId") if name in args}
    bounds = [
        (field, _COMPARE[op], _parse_time(args[name], name))
        for name, (field, op) in _DATE_FILTERS.items()
        if name in args
    ]

    def keep(call):
        """Whether a call passes every equality and date filter."""
        return all(call.get(k) == v for k, v in equal.items()) and all(
            compare(datetime.fromisoformat(call[field]), bound) for field, compare, bound in bounds
        )

    return keep


def create_app(api_key):
    """Build the fake; requests must carry `Authorization: Bearer <api_key>`."""
    app = Flask(__name__)
    lock = threading.Lock()
    state = {}
    outages = Outages(default_status=429)

    def reset():
        """Forget calls, failure rules and counters."""
        state.update(calls={}, queries=[])
        outages.reset()

    reset()

    @app.errorhandler(_VapiError)
    def vapi_error(exc):
        """Render _VapiError in Vapi's NestJS error shape."""
        return exc.body, exc.status, exc.headers

    @app.before_request
    def gatekeeper():
        """Count, inject outages, then check the API key, for every non-control request."""
        if request.path.startswith("/_control/"):
            return
        with lock:
            state["queries"].append(request.args.to_dict())
        bad_key = request.headers.get("Authorization") != f"Bearer {api_key}"
        status = outages.admit(authorized=not bad_key)
        if status:
            headers = {"Retry-After": "0"} if status == 429 else None
            raise _VapiError(
                status,
                "ThrottlerException: Too Many Requests" if status == 429 else "Internal server error",
                headers,
            )
        if bad_key:
            raise _VapiError(
                401,
                "Invalid Key. Hot tip, you may be using the private key "
                "instead of the public key, or vice versa.",
            )

    @app.get("/call")
    def list_calls():
        """GET /call: filtered calls, newest first, at most `limit`, no cursor."""
        args = request.args.to_dict()
        limit, keep = _limit(args.get("limit")), _call_filter(args)
        with lock:
            calls = [c for c in state["calls"].values() if keep(c)]
        calls.sort(key=lambda c: datetime.fromisoformat(c["createdAt"]), reverse=True)
        return calls[:limit]

    @app.get("/call/<call_id>")
    def get_call(call_id):
        """GET /call/:id."""
        with lock:
            call = state["calls"].get(call_id)
        if call is None:
            raise _VapiError(404, "Call not found")
        return call

    @app.post("/_control/calls")
    def control_calls():
        """Add or replace calls (a JSON array of Call objects) by id."""
        calls = request.get_json()
        with lock:
            state["calls"].update({c["id"]: c for c in calls})
            count = len(state["calls"])
        return {"calls": count}

    @app.post("/_control/fail")
    def control_fail():
        """Make the next `count` API requests answer `status`."""
        return outages.arm(request.get_json(silent=True) or {})

    @app.get("/_control/stats")
    def control_stats():
        """Request counters and every query string seen, for assertions."""
        with lock:
            return {**outages.counters(), "queries": list(state["queries"])}

    @app.post("/_control/reset")
    def control_reset():
        """Forget calls, rules and counters."""
        with lock:
            reset()
        return {"reset": True}

    return app
