"""POST /calls: the platform places an outbound call (a reminder, a callback). The call is
admitted first (api.admit_call holds what the wallet affords, under a provisional id), then
created with Vapi's POST /call carrying maxDurationSeconds, so Vapi itself cuts it where its
hold ends; the hold is then bound to the id Vapi returned (api.bind_call).

A crash between Vapi's answer and the binding charges nothing twice and loses no call: the
call's report finds its org by route, and the provisional admission expires. A Vapi that does
not answer (a timeout) may still have created the call, so its admission is kept until it
expires rather than released; only a Vapi that refused is answered by releasing it."""

import uuid

import requests
from flask import Blueprint, current_app, jsonify

from shim.bodies import key
from shim.http_errors import BadRequest, require
from shim.inputs import caller_claims, json_object_body, uuid_field
from shim.queries import QUERIES
from shim.signatures import verify_platform_jwt
from shim.vapi_client import VapiRefused, create_call

bp = Blueprint("calls", __name__)


def _text(body: dict, name: str, label: str | None = None) -> str:
    value = key(body.get(name))
    if value is None:
        label = label or name
        raise BadRequest(f"{label} must be a string of 1 to 255 characters (text, no NUL)", field=label)
    return value


def parse_body(claims: dict) -> dict:
    """The call to place and the org that pays for it: the signed-in user's org, or, for the
    service role only, the body's org_id."""
    body = json_object_body()
    customer = body.get("customer")
    if not isinstance(customer, dict):
        raise BadRequest("customer must be an object with a number", field="customer")
    max_minutes = body.get("max_minutes")
    if max_minutes is not None and (not isinstance(max_minutes, int) or isinstance(max_minutes, bool)):
        raise BadRequest("max_minutes must be an integer", field="max_minutes")
    if claims.get("role") == "service_role":
        org_id = uuid_field(body, "org_id")
    elif "org_id" in body:
        raise BadRequest("org_id may only be given by the service role", field="org_id")
    else:  # verify_supabase_jwt checked that the claim is a uuid
        org_id = (claims.get("app_metadata") or {}).get("org_id")
        if not org_id:
            raise BadRequest("the caller's token names no org (app_metadata.org_id)", field="org_id")
    return {
        "org_id": org_id,
        "assistant_id": _text(body, "assistant_id"),
        "phone_number_id": _text(body, "phone_number_id"),
        "number": _text(customer, "number", "customer.number"),
        "max_minutes": max_minutes,
    }


def _query(name: str, params: dict) -> dict:
    with current_app.extensions["creditledger.pool"].connection() as conn:
        return conn.execute(QUERIES[name], params).fetchone()


@bp.post("/calls")
def place_call():
    """Answer 201 {call_id, max_duration_seconds}; 402 {reason} when the wallet cannot pay."""
    config = current_app.config["CREDITLEDGER"]
    claims = caller_claims(config, verify_platform_jwt)
    call = parse_body(claims)
    require(config.vapi_api_key, "VAPI_API_KEY")

    admission_id = f"admission:{uuid.uuid4()}"
    admitted = _query(
        "admit_call", {"org_id": call["org_id"], "call_id": admission_id, "max_minutes": call["max_minutes"]}
    )
    if admitted["status"] != "applied":
        message = f"the call was not admitted: {admitted['reason']}"
        return jsonify({"error": "refused", "reason": admitted["reason"], "message": message}), 402
    seconds = admitted["max_duration_seconds"]
    body = {
        "assistantId": call["assistant_id"],
        "phoneNumberId": call["phone_number_id"],
        "customer": {"number": call["number"]},
        "assistantOverrides": {
            "maxDurationSeconds": seconds,
            "metadata": {"org_id": call["org_id"], "admission_id": admission_id},
        },
    }
    try:
        created = create_call(config, body)
    except VapiRefused as exc:
        _query("release_call", {"org_id": call["org_id"], "call_id": admission_id})
        status = 503 if exc.status >= 500 or exc.status == 429 else 502
        return jsonify({"error": "vapi_error", "message": f"Vapi answered {exc.status}"}), status
    except requests.RequestException as exc:
        # Vapi may have created the call: the admission stays until it expires.
        return jsonify({"error": "vapi_unavailable", "message": f"Vapi did not answer: {exc}"}), 503
    bound = _query(
        "bind_call", {"org_id": call["org_id"], "admission_id": admission_id, "call_id": created["id"]}
    )
    return jsonify({"call_id": created["id"], "max_duration_seconds": bound["max_duration_seconds"]}), 201
