"""Every Vapi message and object the fakes build is checked against the official server SDK's
pydantic types (vapi-server-sdk), so a shape only our fake sends fails here, not in production.
The SDK's models accept unknown fields and type enums as `Literal[...] | Any`; this check is
stricter on both: enum fields must hold one of the SDK's literals, and a Call may carry no field
the SDK does not define."""

import typing

import pydantic
from vapi import (
    Call,
    ServerMessageAssistantRequest,
    ServerMessageEndOfCallReport,
    ServerMessageResponseAssistantRequest,
    ServerMessageStatusUpdate,
)

MESSAGE_TYPES = {
    "assistant-request": ServerMessageAssistantRequest,
    "end-of-call-report": ServerMessageEndOfCallReport,
    "status-update": ServerMessageStatusUpdate,
}


def _literals(annotation) -> tuple:
    """The Literal values an SDK field annotation allows (empty when it is not an enum)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return tuple(v for arg in typing.get_args(annotation) for v in _literals(arg))


def _check_enums(model: pydantic.BaseModel) -> None:
    for name, field in type(model).model_fields.items():
        allowed = _literals(field.annotation)
        value = getattr(model, name)
        if allowed and value is not None and value not in allowed:
            raise ValueError(f"{type(model).__name__}.{name} = {value!r} is not one of the SDK's values")


def check_call(call: dict) -> dict:
    """`call` as Vapi's Call type defines it; returns it unchanged."""
    parsed = Call.model_validate(call)
    _check_enums(parsed)
    if parsed.model_extra:
        raise ValueError(f"Call has fields the SDK does not define: {sorted(parsed.model_extra)}")
    return call


def check_message(payload: dict) -> dict:
    """A server message ({"message": {...}}) as the SDK's type for its `type` defines it."""
    message = payload["message"]
    parsed = MESSAGE_TYPES[message["type"]].model_validate(message)
    _check_enums(parsed)
    if message.get("call") is not None:
        check_call(message["call"])
    return payload


def check_assistant_answer(answer: dict) -> dict:
    """What a server answers an assistant-request, as ServerMessageResponseAssistantRequest."""
    parsed = ServerMessageResponseAssistantRequest.model_validate(answer)
    overrides = parsed.assistant_overrides
    seconds = overrides.max_duration_seconds if overrides is not None else None
    # Vapi's documented range for maxDurationSeconds.
    if seconds is not None and not 10 <= seconds <= 43200:
        raise ValueError(f"maxDurationSeconds {seconds} is outside 10..43200")
    return answer
