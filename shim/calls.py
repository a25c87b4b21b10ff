"""POST /calls: the platform places an outbound call (a reminder, a callback). The call is
admitted first (api.admit_call holds what the wallet affords, under a provisional id), then
created with Vapi's POST /call carrying maxDurationSeconds, so Vapi itself cuts it where its
hold ends; the hold is then bound to the id Vapi returned (api.bind_call).

A crash between Vapi's answer and the binding charges nothing twice and loses no call: the
call's report finds its org by route, and the provisional admission expires. A Vapi that does
not answer (a timeout) may still have created the call, so its admission is kept until it
expires rather than released; only a Vapi that refused is answered by releasing it."""

import uuid

import httpx
from flask import Blueprint, current_app, jsonify, request
from vapi import AssistantOverrides, CreateCustomerDto
from vapi.core.api_error import ApiError

from shim.http_errors import BadRequest, require
from shim.queries import QUERIES
from shim.signatures import BadSignature, verify_platform_jwt
from shim.vapi_client import make_vapi

bp = Blueprint("calls", __name__)


def _text(body: dict, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= 255:
        raise BadRequest(f"{name} must be a string of 1 to 255 characters")
    return value


def parse_body(claims: dict) -> dict:
    """The call to place and the org that pays for it: the signed-in user's org, or, for the
    service role only, the body's org_id."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    customer = body.get("customer")
    if not isinstance(customer, dict):
        raise BadRequest("customer must be an object with a number")
    max_minutes = body.get("max_minutes")
    if max_minutes is not None and (not isinstance(max_minutes, int) or isinstance(max_minutes, bool)):
        raise BadRequest("max_minutes must be an integer")
    if claims.get("role") == "service_role":
        org_id = body.get("org_id")
    else:
        if "org_id" in body:
            raise BadRequest("org_id may only be given by the service role")
        org_id = (claims.get("app_metadata") or {}).get("org_id")
    try:
        org_id = str(uuid.UUID(str(org_id)))
    except ValueError as exc:
        raise BadRequest(
            "org_id must be a uuid (the caller's org, or the body's for the service role)"
        ) from exc
    return {
        "org_id": org_id,
        "assistant_id": _text(body, "assistant_id"),
        "phone_number_id": _text(body, "phone_number_id"),
        "number": _text(customer, "number"),
        "max_minutes": max_minutes,
    }


def _query(name: str, params: dict) -> dict:
    with current_app.extensions["creditledger.pool"].connection() as conn:
        return conn.execute(QUERIES[name], params).fetchone()


@bp.post("/calls")
def place_call():
    """Answer 201 {call_id, max_duration_seconds}; 402 {reason} when the wallet cannot pay."""
    config = current_app.config["CREDITLEDGER"]
    secret = require(config.supabase_jwt_secret, "SUPABASE_JWT_SECRET")
    try:
        claims = verify_platform_jwt(request.headers.get("Authorization"), secret)
    except BadSignature as exc:
        return jsonify({"error": "unauthorized", "message": str(exc)}), 401
    call = parse_body(claims)
    vapi = make_vapi(config)

    admission_id = f"admission:{uuid.uuid4()}"
    admitted = _query(
        "admit_call", {"org_id": call["org_id"], "call_id": admission_id, "max_minutes": call["max_minutes"]}
    )
    if admitted["status"] != "applied":
        return jsonify({"error": "refused", "reason": admitted["reason"]}), 402
    seconds = admitted["max_duration_seconds"]
    try:
        created = vapi.calls.create(
            assistant_id=call["assistant_id"],
            phone_number_id=call["phone_number_id"],
            customer=CreateCustomerDto(number=call["number"]),
            assistant_overrides=AssistantOverrides(
                max_duration_seconds=seconds,
                metadata={"org_id": call["org_id"], "admission_id": admission_id},
            ),
            request_options={"max_retries": 0},
        )
    except ApiError as exc:
        _query("release_call", {"org_id": call["org_id"], "call_id": admission_id})
        status = 503 if (exc.status_code or 500) >= 500 or exc.status_code == 429 else 502
        return jsonify({"error": "vapi_error", "message": f"Vapi answered {exc.status_code}"}), status
    except httpx.HTTPError as exc:
        # Vapi may have created the call: the admission stays until it expires.
        return jsonify({"error": "vapi_unavailable", "message": f"Vapi did not answer: {exc}"}), 503
    bound = _query(
        "bind_call", {"org_id": call["org_id"], "admission_id": admission_id, "call_id": created.id}
    )
    return jsonify({"call_id": created.id, "max_duration_seconds": bound["max_duration_seconds"]}), 201
