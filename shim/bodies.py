"""Reading what a provider sent without trusting its shape: the JSON a body holds, and the keys
(event ids, types, object ids) the inbox and the reconciliation runs can store as text."""

import hashlib
import json

from shim.http_errors import BadRequest

# billing._check_key: event ids, types and refs are 1..255 characters.
MAX_KEY_CHARS = 255


def read_json(body: bytes) -> tuple[object, str]:
    """The body's JSON value and its text; 400 when it is not UTF-8 JSON.

    The value is None when the JSON nests deeper than Python's decoder recurses (RecursionError,
    about 1,000 levels): it is still the provider's signed body, so it is stored as received
    rather than refused. A raw NUL is refused: JSON escapes control characters (RFC 8259,
    section 7), and PostgreSQL's text cannot hold one."""
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc
    if "\x00" in text:
        raise BadRequest("body is not JSON: it holds a raw NUL character")
    try:
        return json.loads(text), text
    except RecursionError:
        return None, text
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from exc


def key(value) -> str | None:
    """`value` when it can be stored as a key (a string of 1..255 characters that PostgreSQL's
    text can hold: no NUL, no lone surrogate), else None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_KEY_CHARS or "\x00" in value:
        return None
    try:
        value.encode()
    except UnicodeEncodeError:  # a lone surrogate such as "\ud800"
        return None
    return value


def field(mapping, name: str):
    """mapping[name] when mapping is a JSON object (a dict), else None."""
    return mapping.get(name) if isinstance(mapping, dict) else None


def digest_id(kind: str | None, data: bytes | str) -> str:
    """An id for something that carries none usable: its kind and the digest of its bytes, so
    the same bytes delivered again are the same id (a duplicate)."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    return f"{(key(kind) or 'unknown')[:64]}:sha256:{hashlib.sha256(data).hexdigest()}"
