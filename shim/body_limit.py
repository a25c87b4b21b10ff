"""Request bodies over 1 MiB are refused with 413, whether or not they say their length.

With a Content-Length, Flask's MAX_CONTENT_LENGTH refuses an oversized body before it is read.
A chunked body has no length: Werkzeug then wraps the stream in a LimitedStream that stops
reading at MAX_CONTENT_LENGTH and returns what it read, without an error (LimitedStream.readall
only raises when asked to read after the limit), so the view saw the first MiB and answered
400 bad_signature. Here such a body is read once, before the view, up to the limit; one byte
more on the server's stream means it was longer, and it is answered 413."""

from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge

# Providers send small JSON or forms; anything larger is refused before a view sees it.
MAX_BODY_BYTES = 1024 * 1024


def install(app: Flask) -> None:
    """Set the limit and refuse longer bodies that came without a Content-Length."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.before_request
    def refuse_long_unsized_body():
        if request.content_length is not None:
            return  # Werkzeug compares the declared length with the limit itself
        body = request.get_data(cache=True)  # cached: the view and the form parser reuse it
        # The server's own stream (wsgi.input) is only read to EOF when the server terminates
        # chunked input (it sets wsgi.input_terminated, as gunicorn and Werkzeug's server do);
        # without it Werkzeug gave the view no body at all, which a signature check refuses.
        terminated = request.environ.get("wsgi.input_terminated")
        if len(body) >= MAX_BODY_BYTES and terminated and request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
