"""Fake of Vapi's call API (GET /call, GET /call/:id, POST /call) and of Live Call Control
(POST {monitor.controlUrl} {"type": "end-call"}), so the usage poller and call admission can be
tested against the real contract: Bearer auth, `limit` (default 100, at most 1000), the
createdAt/updatedAt Gt/Lt/Ge/Le filters, `id`, `assistantId`, `phoneNumberId`, and a plain JSON
array sorted by createdAt descending with no cursor (Vapi server SDK `ListCallsRequest`). The
calls it places and the server messages they send are shim/fakes/vapi_phone.py's.

Errors follow Vapi's NestJS shape: {"message", "error", "statusCode"}.

Control API (JSON):
POST /_control/calls   [call, ...]  add or replace calls by id (build them with vapi_call)
POST /_control/fail    {"count": n, "status": 429}  next n API requests get that status
                       (429 carries `Retry-After: 0`)
GET  /_control/stats   {"requests", "injected_failures", "unauthorized", "queries": [...]}
POST /_control/server  {"url", "secret"}          where calls send their server messages
POST /_control/inbound {"phone_number_id", "talk_seconds"}   an inbound call (assistant-request first)
POST /_control/web_call {"assistant_id", "talk_seconds"|null, "metadata"?}   a browser call
POST /_control/run/<id> {"talk_seconds"}          a call created with POST /call is answered
POST /_control/hang_up/<id> {"seconds"}           a call held open ends now
POST /_control/reset
"""

import operator
import threading
from datetime import UTC, datetime

from flask import Flask, request
from vapi import AssistantOverrides, CreateCustomerDto

from shim.fakes import payloads
from shim.fakes.outages import Outages
from shim.fakes.vapi_phone import Phone

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

    def record(call):
        with lock:
            state["calls"][call["id"]] = call

    phone = Phone(record)

    def reset():
        """Forget calls, failure rules and counters."""
        state.update(calls={}, queries=[])
        phone.live.clear()
        phone.end_requests.clear()
        outages.reset()

    reset()

    @app.errorhandler(_VapiError)
    def vapi_error(exc):
        """Render _VapiError in Vapi's NestJS error shape."""
        return exc.body, exc.status, exc.headers

    @app.before_request
    def gatekeeper():
        """Count, inject outages, then check the API key, for every non-control request."""
        if request.path.startswith(("/_control/", "/control/")):
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

    @app.post("/call")
    def create_call():
        """POST /call: an outbound call from an assistant and a phone number to a customer,
        queued; assistantOverrides (maxDurationSeconds, metadata) are validated with the SDK."""
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise _VapiError(400, ["body must be an object"])
        for name in ("assistantId", "phoneNumberId"):
            if not isinstance(body.get(name), str):
                raise _VapiError(400, [f"{name} must be a string"])
        try:
            CreateCustomerDto.model_validate(body.get("customer"))
            overrides = AssistantOverrides.model_validate(body.get("assistantOverrides") or {})
        except ValueError as exc:
            raise _VapiError(400, [str(exc)]) from None
        seconds = overrides.max_duration_seconds
        if seconds is not None and not 10 <= seconds <= 43200:
            raise _VapiError(
                400, ["assistant.maxDurationSeconds must not be less than 10 or more than 43200"]
            )
        call = payloads.vapi_call(
            status="queued",
            call_type="outboundPhoneCall",
            assistant_id=body["assistantId"],
            phone_number_id=body["phoneNumberId"],
            customer_number=body["customer"]["number"],
        )
        if body.get("assistantOverrides"):
            call["assistantOverrides"] = body["assistantOverrides"]
        phone.create(call)
        record(call)
        return call, 201

    @app.post("/control/<call_id>")
    def live_call_control(call_id):
        """A call's control URL. Only end-call is implemented; a call no longer live is 404."""
        body = request.get_json(silent=True) or {}
        if body.get("type") != "end-call":
            raise _VapiError(400, ["type must be one of the supported control messages"])
        if not phone.end_call(call_id):
            raise _VapiError(404, "Call not found or not in progress")
        return {"status": "ok"}

    @app.post("/_control/server")
    def control_server():
        """Where server messages go, and the secret they carry."""
        body = request.get_json()
        phone.server_url, phone.secret = body["url"], body["secret"]
        phone.control_base = request.host_url.rstrip("/")
        return {"server_url": phone.server_url}

    @app.post("/_control/inbound")
    def control_inbound():
        body = request.get_json()
        return phone.inbound(body["phone_number_id"], body["talk_seconds"])

    @app.post("/_control/web_call")
    def control_web_call():
        body = request.get_json()
        return phone.web_call(body["assistant_id"], body.get("talk_seconds"), body.get("metadata"))

    @app.post("/_control/run/<call_id>")
    def control_run(call_id):
        return phone.run_queued(call_id, request.get_json()["talk_seconds"])

    @app.post("/_control/hang_up/<call_id>")
    def control_hang_up(call_id):
        ended = phone.hang_up(call_id, request.get_json()["seconds"], "customer-ended-call")
        return {"ended": ended is not None}

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
            return {
                **outages.counters(),
                "queries": list(state["queries"]),
                "end_requests": list(phone.end_requests),
                "live": sorted(phone.live),
            }

    @app.post("/_control/reset")
    def control_reset():
        """Forget calls, rules and counters."""
        with lock:
            reset()
        return {"reset": True}

    return app
