"""The JSON bodies of the client endpoints (/top-ups, /calls): each field checked against the
type of the SQL parameter it feeds, so a value the cast would refuse (a number past bigint, an id
that is not a uuid) is a 400 naming that field instead of a database error. Ranges and business
rules (the top-up bounds, what an org may do) stay in SQL, which names the field too (22023)."""

import uuid

from flask import request

from shim.http_errors import BadRequest, Unauthorized, require
from shim.signatures import BadSignature

BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1


def json_object_body() -> dict:
    """The request's JSON object, or 400. Flask's get_json(silent=True) turns a ValueError into
    None but lets RecursionError through (a body nested a few thousand levels deep): a 500."""
    try:
        body = request.get_json(silent=True)
    except RecursionError:
        body = None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


def bigint_field(body: dict, name: str) -> int:
    """An integer that fits PostgreSQL's bigint (amounts in minor units)."""
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):  # JSON true is a Python int
        raise BadRequest(f"{name} must be an integer number of minor units", field=name)
    if not BIGINT_MIN <= value <= BIGINT_MAX:
        raise BadRequest(f"{name} does not fit a bigint (64 bits)", field=name)
    return value


def uuid_field(body: dict, name: str) -> str:
    """A uuid in any form uuid.UUID reads, passed on in its canonical form."""
    value = body.get(name)
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a uuid", field=name)
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise BadRequest(f"{name} must be a uuid", field=name) from exc


def caller_claims(config, verify) -> dict:
    """The claims of the request's Supabase token, checked by `verify` (a signed-in user, or
    also the service role), or 401."""
    secret = require(config.supabase_jwt_secret, "SUPABASE_JWT_SECRET")
    try:
        return verify(request.headers.get("Authorization"), secret)
    except BadSignature as exc:
        raise Unauthorized(str(exc)) from exc
