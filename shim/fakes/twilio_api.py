"""Fake of Twilio's Message fetch (GET /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json), so
Twilio reconciliation can be tested with the real SDK against the documented contract: HTTP Basic
auth (Account SID : Auth Token), the Message resource with every field a real one carries
(RFC 2822 dates, counts and prices as strings, `subresource_uris` for media and feedback), and
errors in Twilio's REST shape {"code", "message", "more_info", "status"} (20003 bad credentials,
20404 no such message, 20429 rate limit, 20500 / 20503 outages).

Sources: Twilio "Messages resource" (twilio.com/docs/messaging/api/message-resource), "Twilio API
responses" (twilio.com/docs/usage/twilios-response) and the 20404 error page
(twilio.com/docs/errors/20404).

Control API (JSON):
POST /_control/messages  [{"sid", "status", ...}, ...]  add or replace messages by sid; every
                         field left out gets a realistic value (see message_resource)
POST /_control/fail      {"count": n, "status": 500}  next n API requests get that status
                         (429 carries `Retry-After: 0`)
GET  /_control/stats     {"requests", "injected_failures", "unauthorized", "fetched": [sid, ...]}
POST /_control/reset
"""

import threading
from datetime import UTC, datetime
from email.utils import format_datetime

from flask import Flask, request

from shim.fakes.outages import Outages

API_VERSION = "2010-04-01"
_ERRORS = {
    401: (20003, "Authenticate"),
    404: (20404, "The requested resource {path} was not found"),
    429: (20429, "Too Many Requests"),
    500: (20500, "Internal Server Error"),
    503: (20503, "Service Unavailable"),
}
# Statuses Twilio has not yet sent the message in: no date_sent, no price.
_UNSENT = {"accepted", "scheduled", "queued", "sending", "canceled"}
# What Twilio reports for a failed or undelivered message.
_FAILURE = {
    "failed": (30008, "Unknown error"),
    "undelivered": (30003, "Unreachable destination handset"),
}


class _TwilioError(Exception):
    """An error response in Twilio's REST shape."""

    def __init__(self, status, headers=None):
        code, message = _ERRORS[status]
        super().__init__(message)
        self.status = status
        self.body = {
            "code": code,
            "message": message.format(path=request.path),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
        self.headers = headers or {}


def _rfc2822(moment):
    """A date the way the 2010 API writes it: `Thu, 24 Aug 2023 05:01:45 +0000`."""
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0))


def message_resource(account_sid, sid, status="delivered", *, segments=1, created_at=None, **fields):
    """A Message resource as GET .../Messages/{Sid}.json returns it; `fields` override any field."""
    created = created_at or datetime.now(UTC)
    uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{sid}"
    code, text = _FAILURE.get(status, (None, None))
    resource = {
        "account_sid": account_sid,
        "api_version": API_VERSION,
        "body": "Your appointment is tomorrow at 10:00.",
        "date_created": _rfc2822(created),
        "date_sent": None if status in _UNSENT else _rfc2822(created),
        "date_updated": _rfc2822(created),
        "direction": "outbound-api",
        "error_code": code,
        "error_message": text,
        "from": "+15550100300",
        "messaging_service_sid": None,
        "num_media": "0",
        "num_segments": str(segments),
        "price": None if status in _UNSENT else f"-{0.0079 * segments:.5f}",
        "price_unit": "USD",
        "sid": sid,
        "status": status,
        "subresource_uris": {"media": f"{uri}/Media.json", "feedback": f"{uri}/Feedback.json"},
        "to": "+15550100400",
        "uri": f"{uri}.json",
    }
    return resource | fields


def create_app(account_sid, auth_token):
    """Build the fake for one account; API requests must carry Basic auth with its credentials."""
    app = Flask(__name__)
    lock = threading.Lock()
    state = {}
    outages = Outages(default_status=500)

    def reset():
        """Forget messages, failure rules and counters."""
        state.update(messages={}, fetched=[])
        outages.reset()

    reset()

    @app.errorhandler(_TwilioError)
    def twilio_error(exc):
        """Render _TwilioError in Twilio's REST error shape."""
        return exc.body, exc.status, exc.headers

    @app.before_request
    def gatekeeper():
        """Count, inject outages, then check the credentials, for every non-control request."""
        if request.path.startswith("/_control/"):
            return
        auth = request.authorization
        bad_auth = auth is None or (auth.username, auth.password) != (account_sid, auth_token)
        status = outages.admit(authorized=not bad_auth)
        if status:
            raise _TwilioError(status, {"Retry-After": "0"} if status == 429 else None)
        if bad_auth:
            raise _TwilioError(401)

    @app.get(f"/{API_VERSION}/Accounts/<path_account>/Messages/<sid>.json")
    def fetch_message(path_account, sid):
        """Fetch one message of this account (another account's SID finds nothing)."""
        with lock:
            state["fetched"].append(sid)
            message = state["messages"].get(sid) if path_account == account_sid else None
        if message is None:
            raise _TwilioError(404)
        return message

    @app.post("/_control/messages")
    def control_messages():
        """Add or replace messages: each a partial resource with at least `sid`."""
        specs = request.get_json()
        with lock:
            for spec in specs:
                state["messages"][spec["sid"]] = message_resource(account_sid, **spec)
            count = len(state["messages"])
        return {"messages": count}

    @app.post("/_control/fail")
    def control_fail():
        """Make the next `count` API requests answer `status`."""
        return outages.arm(request.get_json(silent=True) or {})

    @app.get("/_control/stats")
    def control_stats():
        """Request counters and every SID fetched, for assertions."""
        with lock:
            return {**outages.counters(), "fetched": list(state["fetched"])}

    @app.post("/_control/reset")
    def control_reset():
        """Forget messages, rules and counters."""
        with lock:
            reset()
        return {"reset": True}

    return app
