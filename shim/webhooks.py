"""POST /webhooks/{stripe,vapi,twilio/sms-status}: verify, then one SQL call that stores the
event and applies it in the same transaction. 200 means committed (applied, duplicate, ignored,
or stored as failed for the worker); anything else makes the provider retry."""

import hashlib
import json

import psycopg
from flask import Blueprint, Response, current_app, jsonify, request

from shim.call_control import end_due_calls
from shim.http_errors import BadRequest, require
from shim.queries import QUERIES
from shim.signatures import verify_stripe, verify_twilio, verify_vapi

bp = Blueprint("webhooks", __name__)


def store(provider: str, event_id: str, event_type: str, payload: str) -> str:
    """Hand a verified event (`payload`: a JSON object's text) to api.ingest_webhook and return
    its outcome (JSON text); the commit is done when this returns."""
    pool = current_app.extensions["creditledger.pool"]
    with pool.connection() as conn:
        return conn.execute(
            QUERIES["ingest_webhook"],
            {"provider": provider, "event_id": event_id, "event_type": event_type, "payload": payload},
        ).fetchone()["outcome"]


def ingest(provider: str, event_id: str, event_type: str, payload: str):
    """Store and apply an event; its commit is what the 200 promises. The outcome is relayed
    as the database wrote it."""
    return Response(store(provider, event_id, event_type, payload), status=200, mimetype="application/json")


def json_object(body: bytes) -> tuple[dict, str]:
    """The body as a JSON object, and as the UTF-8 text the inbox stores; or 400."""
    try:
        text = body.decode()
        payload = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise BadRequest("body is not a JSON object")
    return payload, text


@bp.post("/webhooks/stripe")
def stripe_webhook():
    """Stripe events: the signature is checked over the raw bytes before anything is parsed."""
    secret = require(current_app.config["CREDITLEDGER"].stripe_webhook_secret, "STRIPE_WEBHOOK_SECRET")
    body = request.get_data()
    verify_stripe(body, request.headers.get("Stripe-Signature"), secret)
    payload, text = json_object(body)
    if not payload.get("id") or not payload.get("type"):
        raise BadRequest("a Stripe event has an id and a type")
    return ingest("stripe", payload["id"], payload["type"], text)


def vapi_event_id(message: dict, body: bytes) -> str:
    """Vapi messages carry no id: a report and an assistant-request are one per call, a status
    update one per call and status; anything else is identified by its bytes (redelivered bytes
    are a duplicate)."""
    call = message.get("call")
    call_id = call.get("id") if isinstance(call, dict) else None
    kind = message["type"]
    if isinstance(call_id, str) and call_id and kind in ("end-of-call-report", "assistant-request"):
        return f"{kind}:{call_id}"
    if isinstance(call_id, str) and call_id and kind == "status-update":
        return f"{kind}:{call_id}:{message.get('status')}"
    return f"{kind}:sha256:{hashlib.sha256(body).hexdigest()}"


@bp.post("/webhooks/vapi")
def vapi_webhook():
    """Vapi server messages. An assistant-request (an inbound call waiting to be answered, for
    at most 7.5 s) is answered with what SQL decided: the org's assistant and the admitted
    maxDurationSeconds, or the sentence spoken to a refused caller. A call refused when it
    started is ended through its control URL once its refusal is committed."""
    config = current_app.config["CREDITLEDGER"]
    secret = require(config.vapi_webhook_secret, "VAPI_WEBHOOK_SECRET")
    body = request.get_data()
    verify_vapi(body, request.headers, secret)
    payload, text = json_object(body)
    message = payload.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("type"), str) or not message["type"]:
        raise BadRequest("a Vapi server message has message.type")
    outcome = store("vapi", vapi_event_id(message, body), message["type"], text)
    decided = json.loads(outcome)
    if message["type"] == "assistant-request" and "answer" in decided:
        return jsonify(decided["answer"])
    if decided.get("end_call"):
        try:
            end_due_calls(
                current_app.extensions["creditledger.pool"], config, only_call_id=message["call"]["id"]
            )
        except psycopg.Error:  # the refusal is committed: the worker ends the call instead
            current_app.logger.exception("could not end refused call %s now", message["call"]["id"])
    return Response(outcome, status=200, mimetype="application/json")


@bp.post("/webhooks/twilio/sms-status")
def twilio_sms_status():
    """Twilio's SMS StatusCallback: form fields, signed over the URL Twilio was given."""
    cfg = current_app.config["CREDITLEDGER"]
    token = require(cfg.twilio_auth_token, "TWILIO_AUTH_TOKEN")
    base = require(cfg.public_base_url, "PUBLIC_BASE_URL")
    params = request.form.to_dict()
    query = request.query_string.decode()
    url = base.rstrip("/") + request.path + (f"?{query}" if query else "")
    verify_twilio(url, params, request.headers.get("X-Twilio-Signature"), token)
    sid = params.get("MessageSid") or params.get("SmsSid")
    status = params.get("MessageStatus") or params.get("SmsStatus")
    if not sid or not status:
        raise BadRequest("a status callback has MessageSid and MessageStatus")
    return ingest("twilio", f"{sid}:{status}", f"message.{status}", json.dumps(params))
