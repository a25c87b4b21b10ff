"""The HTTP baseline: a Flask app under the same gunicorn settings as the shim, whose webhook
endpoint reads the body and answers 200 at once (what the HTTP stack alone costs)."""

from flask import Flask, request

app = Flask("bare")


@app.post("/webhooks/stripe")
@app.post("/webhooks/vapi")
def accept():
    request.get_data()
    return {"status": "accepted"}, 200
