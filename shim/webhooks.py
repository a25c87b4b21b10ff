"""POST /webhooks/{stripe,vapi,twilio/sms-status}: verify, then one SQL call that stores the
event and applies it in the same transaction. 200 means committed (applied, duplicate, ignored,
or stored as failed for the worker); anything else makes the provider retry.

A signed body this system cannot interpret (PostgreSQL refuses its JSON, or its shape names no
event) is stored as received, failed then dead and alerted, and answered 200 once committed:
no retry can change it, and 2xx is what stops each provider's retries.
- Stripe retries any non-2xx answer with exponential backoff for up to three days in live mode
  (https://docs.stripe.com/webhooks, "Retry behavior"; https://support.stripe.com/questions/
  troubleshooting-webhook-delivery-issues: "we will retry delivery several times").
- Vapi retries a server message by its server's backoffPlan: "By default, the request will be
  retried for any non-2xx status code" not in excludedStatusCodes (Vapi API reference, schema
  BackoffPlan; maxRetries defaults to 0; https://docs.vapi.ai/server-url/events).
- Twilio retries a callback per its connection overrides (`#rc=`, `#rp=` with 4xx/5xx) and logs
  every 4xx/5xx answer as error 11200/11217 in the Debugger
  (https://www.twilio.com/docs/usage/webhooks/webhooks-connection-overrides,
  https://www.twilio.com/docs/api/errors/11217: "Ensure that you can get 2xx status codes").
Only a body whose signature fails, or that is not UTF-8 JSON at all, is a 400 with nothing stored."""

import json

import psycopg
from flask import Blueprint, Response, current_app, jsonify, request

from shim.bodies import digest_id, field, key, read_json
from shim.call_control import end_due_calls
from shim.http_errors import require
from shim.queries import QUERIES
from shim.retry import with_connection
from shim.signatures import verify_stripe, verify_twilio, verify_vapi

bp = Blueprint("webhooks", __name__)


def store(
    provider: str, event_id: str, event_type: str | None, body: str, raw_body: str | None = None
) -> str:
    """Hand a verified event to api.ingest_webhook_text: `body` is the JSON text SQL interprets,
    `raw_body` the request body when that is not `body` itself; `event_type` None when the body
    names none. Returns the outcome (JSON text) once it is committed."""
    pool = current_app.extensions["creditledger.pool"]
    params = {
        "provider": provider,
        "event_id": event_id,
        "event_type": event_type,
        "body": body,
        "raw_body": raw_body,
    }

    def stored(conn):  # one statement, one transaction: run again if rolled back (40001, 40P01)
        return conn.execute(QUERIES["ingest_webhook_text"], params).fetchone()["outcome"]

    return with_connection(pool, stored)


def ingest(provider: str, event_id: str, event_type: str | None, body: str, raw_body: str | None = None):
    """Store and apply an event; its commit is what the 200 promises. The outcome is relayed as
    the database wrote it."""
    return Response(
        store(provider, event_id, event_type, body, raw_body), status=200, mimetype="application/json"
    )


@bp.post("/webhooks/stripe")
def stripe_webhook():
    """Stripe events: the signature is checked over the raw bytes before anything is parsed."""
    secret = require(current_app.config["CREDITLEDGER"].stripe_webhook_secret, "STRIPE_WEBHOOK_SECRET")
    body = request.get_data()
    verify_stripe(body, request.headers.get("Stripe-Signature"), secret)
    payload, text = read_json(body)
    event_type = key(field(payload, "type"))
    # An event without a usable id is still Stripe's: its bytes identify it.
    event_id = key(field(payload, "id")) or digest_id(event_type, body)
    return ingest("stripe", event_id, event_type, text)


def vapi_event_id(message: dict, body: bytes) -> str:
    """Vapi messages carry no id: a report and an assistant-request are one per call, a status
    update one per call and status; anything else is identified by its bytes (redelivered bytes
    are a duplicate)."""
    call_id = key(field(message.get("call"), "id"))
    kind = key(message.get("type")) or "unknown"
    event_id = None
    if call_id and kind in ("end-of-call-report", "assistant-request"):
        event_id = f"{kind}:{call_id}"
    elif call_id and kind == "status-update":
        event_id = f"{kind}:{call_id}:{message.get('status')}"
    # key(): a status that is no clean string, or an id too long to store, falls back to the bytes.
    return key(event_id) or digest_id(kind, body)


@bp.post("/webhooks/vapi")
def vapi_webhook():
    """Vapi server messages. An assistant-request (an inbound call waiting to be answered, for
    at most 7.5 s, https://docs.vapi.ai/server-url/events) is answered with what SQL decided:
    the org's assistant and the admitted maxDurationSeconds, or the sentence spoken to a refused
    caller. A call refused when it started is ended through its control URL once its refusal is
    committed."""
    config = current_app.config["CREDITLEDGER"]
    secret = require(config.vapi_webhook_secret, "VAPI_WEBHOOK_SECRET")
    body = request.get_data()
    verify_vapi(body, request.headers, secret)
    payload, text = read_json(body)
    message = field(payload, "message")
    message = message if isinstance(message, dict) else {}
    outcome = store("vapi", vapi_event_id(message, body), key(message.get("type")), text)
    decided = json.loads(outcome)
    if "answer" in decided:  # an assistant-request: Vapi reads the answer, nothing else
        return jsonify(decided["answer"])
    if decided.get("end_call"):
        call_id = message["call"]["id"]
        try:
            end_due_calls(current_app.extensions["creditledger.pool"], config, only_call_id=call_id)
        except psycopg.Error:  # the refusal is committed: the worker ends the call instead
            current_app.logger.exception("could not end refused call %s now", call_id)
    return Response(outcome, status=200, mimetype="application/json")


@bp.post("/webhooks/twilio/sms-status")
def twilio_sms_status():
    """Twilio's SMS StatusCallback: form fields, signed over the URL Twilio was given."""
    cfg = current_app.config["CREDITLEDGER"]
    token = require(cfg.twilio_auth_token, "TWILIO_AUTH_TOKEN")
    base = require(cfg.public_base_url, "PUBLIC_BASE_URL")
    # Read before the form: Werkzeug then parses the form from these cached bytes.
    raw = request.get_data(cache=True)
    params = request.form.to_dict()
    query = request.query_string.decode()
    url = base.rstrip("/") + request.path + (f"?{query}" if query else "")
    verify_twilio(url, params, request.headers.get("X-Twilio-Signature"), token)
    sid = key(params.get("MessageSid") or params.get("SmsSid"))
    status = key(params.get("MessageStatus") or params.get("SmsStatus"))
    event_id = key(f"{sid}:{status}") if sid and status else None
    # The form as received, for an operator, when its fields cannot be stored (a %00 in a field):
    # URL-encoded, so it is text; anything text cannot hold is escaped, never dropped.
    form = raw.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    return ingest(
        "twilio",
        event_id or digest_id(None, raw),
        f"message.{status}" if event_id else None,
        json.dumps(params),
        form,
    )
