"""Stateful fake of the slice of the Stripe API creditledger uses, speaking stripe-python 16's
HTTP: form-encoded bracket-keyed bodies, Bearer auth, Stripe's JSON list and error shapes,
Idempotency-Key replay, and signed webhook deliveries of every event it raises.

Tests and the demo drive the money-moving parts a real customer or bank would (paying on the
Checkout page, refunds, disputes, card declines, outages) through the JSON `/_control/` API;
see `create_app` for the list.
"""

import copy
import fnmatch
import json
import random
import re
import threading
from collections import Counter, defaultdict

import requests
from flask import Flask, g, request

from shim.fakes import payloads as p

# Stripe saves the outcome of any request whose endpoint started executing, success or card
# error alike, and replays it for the same Idempotency-Key; validation errors are not saved
# (docs.stripe.com/api/idempotent_requests). Injected outages count as "never reached us".
_REPLAYABLE = frozenset({200, 402})
_DISPUTE_FEE = 1500
_CARD_ERROR_MESSAGES = {
    "card_declined": "Your card was declined.",
    "authentication_required": "Your card was declined. This transaction requires authentication.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
}
_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")


def _doc_url(code):
    """Stripe's documentation link for an error code."""
    return f"https://stripe.com/docs/error-codes/{code.replace('_', '-')}"


class ApiError(Exception):
    """A Stripe error response: HTTP status plus the `error` hash stripe-python parses."""

    def __init__(self, status, error_type, message, *, code=None, param=None, **extra):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"type": error_type, "message": message, **extra}}
        if code:
            self.body["error"]["code"] = code
            self.body["error"]["doc_url"] = _doc_url(code)
        if param:
            self.body["error"]["param"] = param


def _invalid(message, *, param=None, code=None, status=400):
    """An invalid_request_error, Stripe's answer to bad parameters (HTTP 400 unless given)."""
    return ApiError(status, "invalid_request_error", message, code=code, param=param)


def _missing(kind, object_id, param):
    """The 404 Stripe returns for an unknown id."""
    return _invalid(f"No such {kind}: '{object_id}'", param=param, code="resource_missing", status=404)


# --------------------------------------------------------------------------- parameter parsing


def _listify(node):
    """Turn dicts keyed "0", "1", ... (indexed arrays such as line_items[0]) into lists."""
    if not isinstance(node, dict):
        return node
    items = {k: _listify(v) for k, v in node.items()}
    if items and all(k.isdigit() for k in items):
        return [items[k] for k in sorted(items, key=int)]
    return items


def _nest(pairs):
    """Parse Stripe's bracket keys (`metadata[org_id]`, `line_items[0][quantity]`, `types[]`)
    into nested dicts and lists of strings."""
    root = {}
    for key, value in pairs:
        match = _KEY.fullmatch(key)
        if not match:
            raise _invalid(f"Invalid parameter name: {key}", param=key)
        path = [match[1], *re.findall(r"\[([^\[\]]*)\]", match[2])]
        append = path[-1] == "" and len(path) > 1
        if append:
            path.pop()
        node = root
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise _invalid(f"Invalid parameter name: {key}", param=key)
        if append:
            node.setdefault(path[-1], []).append(value)
        else:
            node[path[-1]] = value
    return _listify(root)


def _int(value, param, *, minimum=None):
    """Coerce a form value to int the way Stripe validates integers."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _invalid(f"Invalid integer: {value}", param=param, code="parameter_invalid_integer") from None
    if minimum is not None and number < minimum:
        raise _invalid(
            f"This value must be greater than or equal to {minimum}.",
            param=param,
            code="parameter_invalid_integer",
        )
    return number


def _bool(value, param):
    """Coerce "true"/"false" (how stripe-python encodes booleans)."""
    if value in (None, "false"):
        return False
    if value == "true":
        return True
    raise _invalid(f"Invalid boolean: {value}", param=param)


def _metadata(value, param):
    """Metadata hash; empty values unset keys, as on Stripe."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid("Invalid object", param=param)
    return {k: v for k, v in value.items() if v != ""}


def _required(params, name):
    """A parameter Stripe requires; missing ones get Stripe's parameter_missing error."""
    if params.get(name) in (None, ""):
        raise _invalid(f"Missing required param: {name}.", param=name, code="parameter_missing")
    return params[name]


# --------------------------------------------------------------------------- state


class _State:
    """Everything the fake remembers. One lock guards it; webhooks are POSTed outside it so a
    receiver may call back into the fake while handling a delivery."""

    KINDS = ("checkout.session", "payment_intent", "charge", "refund", "dispute", "event")

    def __init__(self, webhook_url, webhook_secret):
        self.lock = threading.RLock()
        self.webhook_url = webhook_url
        self.webhook_secret = webhook_secret
        self.reset()

    def reset(self):
        """Forget every object, key, rule and counter; keep the webhook endpoint."""
        self.seq = 0
        self.order = {}
        self.store = {kind: {} for kind in self.KINDS}
        self.payment_intent_data = {}
        self.idempotency = {}
        self.declines = {}
        self.failures = []
        self.endpoints = defaultdict(Counter)
        self.injected_failures = 0
        self.webhooks = Counter()
        self.webhook_errors = []
        self.undelivered = {}
        self.deliver = True
        self.drop_ratio = 0.0
        self.rng = random.Random(0)
        self.delivery_timeout = 5.0

    def put(self, obj):
        """Store (or replace) an object under its `object` kind, keeping creation order."""
        if obj["id"] not in self.order:
            self.seq += 1
            self.order[obj["id"]] = self.seq
        self.store[obj["object"]][obj["id"]] = obj
        return obj

    def get(self, kind, object_id, param):
        """Fetch a stored object or raise Stripe's resource_missing error."""
        try:
            return self.store[kind][object_id]
        except KeyError:
            raise _missing(kind, object_id, param) from None

    def sort_key(self, obj):
        """Newest-first order, like Stripe lists: by `created`, ties by creation order."""
        return obj["created"], self.order[obj["id"]]

    def emit(self, event_type, obj, *, request_info=None):
        """Record an event carrying a snapshot of `obj`; the caller delivers it after
        releasing the lock."""
        request_info = request_info or {}
        event = p.stripe_event(
            event_id=p.stripe_id("evt"),
            event_type=event_type,
            data_object=copy.deepcopy(obj),
            request_id=request_info.get("id"),
            idempotency_key=request_info.get("idempotency_key"),
            pending_webhooks=1 if self.webhook_url else 0,
        )
        return self.put(event)


# --------------------------------------------------------------------------- lists


def _created_filter(value):
    """Build a predicate from `created` or `created[gt|gte|lt|lte]`."""
    if value is None:
        return lambda _created: True
    if not isinstance(value, dict):
        exact = _int(value, "created")
        return lambda created: created == exact
    ops = {"gt": int.__gt__, "gte": int.__ge__, "lt": int.__lt__, "lte": int.__le__}
    unknown = set(value) - set(ops)
    if unknown:
        raise _invalid(f"Received unknown parameter: created[{unknown.pop()}]", param="created")
    bounds = [(ops[op], _int(v, f"created[{op}]")) for op, v in value.items()]
    return lambda created: all(op(created, bound) for op, bound in bounds)


def _page(state, kind, items, url, params):
    """Stripe's cursor pagination: `limit` (1-100, default 10), `starting_after` /
    `ending_before` object ids, newest first, `has_more` when the cursor can go on."""
    limit = _int(params.get("limit", 10), "limit", minimum=1)
    if limit > 100:
        raise _invalid(
            "This value must be less than or equal to 100.",
            param="limit",
            code="parameter_invalid_integer",
        )
    keep = _created_filter(params.get("created"))
    items = sorted((o for o in items if keep(o["created"])), key=state.sort_key, reverse=True)
    after, before = params.get("starting_after"), params.get("ending_before")
    if after:
        cursor = state.sort_key(state.get(kind, after, "starting_after"))
        rest = [o for o in items if state.sort_key(o) < cursor]
        data, has_more = rest[:limit], len(rest) > limit
    elif before:
        cursor = state.sort_key(state.get(kind, before, "ending_before"))
        rest = [o for o in items if state.sort_key(o) > cursor]
        data, has_more = rest[-limit:], len(rest) > limit
    else:
        data, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": data, "has_more": has_more, "url": url}


def _expand(state, obj, params):
    """Apply top-level `expand[]` paths by inlining stored objects, as Stripe does."""
    paths = params.get("expand") or []
    if not paths:
        return obj
    obj = copy.deepcopy(obj)
    for path in paths if isinstance(paths, list) else [paths]:
        target = obj.get(path)
        found = next(
            (s[target] for s in state.store.values() if isinstance(target, str) and target in s),
            None,
        )
        if path not in obj or (target is not None and found is None):
            raise _invalid(f"This property cannot be expanded ({path}).", param="expand")
        obj[path] = copy.deepcopy(found)
    return obj


# --------------------------------------------------------------------------- money movements


def _create_session(state, params):
    """POST /v1/checkout/sessions: an open payment-mode session priced from `price_data`."""
    if _required(params, "mode") != "payment":
        raise _invalid("The fake supports only mode=payment.", param="mode")
    line_items = _required(params, "line_items")
    if not isinstance(line_items, list):
        raise _invalid("Invalid array", param="line_items")
    amount, currencies = 0, set()
    for i, item in enumerate(line_items):
        price = item.get("price_data") if isinstance(item, dict) else None
        if not isinstance(price, dict):
            raise _invalid(
                "The fake supports only line_items[].price_data.",
                param=f"line_items[{i}][price_data]",
            )
        currencies.add(_required(price, "currency").lower())
        where = f"line_items[{i}]"
        unit_amount = _int(_required(price, "unit_amount"), f"{where}[unit_amount]", minimum=0)
        amount += unit_amount * _int(item.get("quantity", 1), f"{where}[quantity]", minimum=1)
    if len(currencies) != 1:
        raise _invalid("All line items must share one currency.", param="line_items")
    session = p.stripe_checkout_session(
        session_id=p.checkout_session_id(),
        org_id=params.get("client_reference_id"),
        amount_total=amount,
        currency=currencies.pop(),
        payment_status="unpaid",
        status="open",
        metadata=_metadata(params.get("metadata"), "metadata"),
        customer=params.get("customer"),
        customer_email=params.get("customer_email"),
        success_url=params.get("success_url"),
        cancel_url=params.get("cancel_url"),
    )
    pi_data = params.get("payment_intent_data") or {}
    state.payment_intent_data[session["id"]] = {
        "metadata": _metadata(pi_data.get("metadata"), "payment_intent_data[metadata]"),
        "setup_future_usage": pi_data.get("setup_future_usage"),
        "description": pi_data.get("description"),
    }
    return state.put(session)


def _new_charge(state, *, pi_id, amount, currency, customer, payment_method, metadata, failure=None):
    """Record the charge a confirmation produces (failed when `failure` is a card code)."""
    return state.put(
        p.stripe_charge(
            charge_id=p.stripe_id("ch"),
            payment_intent=pi_id,
            amount=amount,
            currency=currency,
            customer=customer,
            payment_method=payment_method,
            metadata=metadata,
            status="failed" if failure else "succeeded",
            failure_code=failure,
            failure_message=_CARD_ERROR_MESSAGES.get(failure, "Your card was declined.") if failure else None,
        )
    )


def _complete_session(state, session_id, body):
    """Play the customer paying on the Checkout page: the session completes, its
    PaymentIntent (metadata from payment_intent_data) succeeds with a charge."""
    session = state.get("checkout.session", session_id, "session")
    if session["status"] != "open":
        raise _invalid(f"Checkout Session {session_id} is {session['status']}, not open.")
    pi_data = state.payment_intent_data[session_id]
    customer = session["customer"] or body.get("customer") or p.stripe_id("cus", 14)
    payment_method = body.get("payment_method") or p.stripe_id("pm")
    pi_id = p.stripe_id("pi")
    amount, currency = session["amount_total"], session["currency"]
    charge = _new_charge(
        state,
        pi_id=pi_id,
        amount=amount,
        currency=currency,
        customer=customer,
        payment_method=payment_method,
        metadata=pi_data["metadata"],
    )
    intent = state.put(
        p.stripe_payment_intent(
            pi_id=pi_id,
            org_id=None,
            amount=amount,
            currency=currency,
            metadata=pi_data["metadata"],
            customer=customer,
            payment_method=payment_method,
            latest_charge=charge["id"],
            setup_future_usage=pi_data["setup_future_usage"],
            description=pi_data["description"],
        )
    )
    session = state.put(
        p.stripe_checkout_session(
            session_id=session_id,
            org_id=session["client_reference_id"],
            amount_total=amount,
            currency=currency,
            payment_intent=pi_id,
            metadata=session["metadata"],
            created=session["created"],
            customer=customer,
            customer_email=body.get("email") or session["customer_email"],
            success_url=session["success_url"],
            cancel_url=session["cancel_url"],
        )
    )
    events = [
        state.emit("checkout.session.completed", session),
        state.emit("payment_intent.succeeded", intent),
    ]
    result = {"session": session, "payment_intent": intent, "charge": charge}
    return result, events


def _expire_session(state, session_id):
    """POST /v1/checkout/sessions/{id}/expire: an open session can no longer be paid, its URL
    is gone, and checkout.session.expired follows (https://docs.stripe.com/api/checkout/sessions/expire)."""
    session = state.get("checkout.session", session_id, "session")
    if session["status"] != "open":
        raise _invalid(
            'Only Checkout Sessions with a status in ["open"] can be expired. '
            f'This Checkout Session has a status of "{session["status"]}".'
        )
    session = state.put({**session, "status": "expired", "url": None})
    return session, [state.emit("checkout.session.expired", session)]


def _create_payment_intent(state, params, request_info):
    """POST /v1/payment_intents; with confirm=true it charges at once: success, or a 402
    card_error when the payment method was told to decline (see /_control/decline)."""
    amount = _int(_required(params, "amount"), "amount", minimum=1)
    currency = _required(params, "currency").lower()
    if amount < 50:
        raise _invalid("Amount must be at least 50 cents.", param="amount", code="amount_too_small")
    confirm = _bool(params.get("confirm"), "confirm")
    off_session = params.get("off_session") in ("true", "one_off", "recurring")
    if off_session and not confirm:
        raise _invalid("off_session can only be used when confirm=true.", param="off_session")
    customer, payment_method = params.get("customer"), params.get("payment_method")
    if confirm and not payment_method:
        raise _invalid(
            "You must provide a payment_method to confirm.",
            param="payment_method",
            code="parameter_missing",
        )
    metadata = _metadata(params.get("metadata"), "metadata")
    pi_id = p.stripe_id("pi")
    fields = {
        "pi_id": pi_id,
        "org_id": None,
        "amount": amount,
        "currency": currency,
        "metadata": metadata,
        "customer": customer,
        "payment_method": payment_method,
        "description": params.get("description"),
        "setup_future_usage": params.get("setup_future_usage"),
    }
    if not confirm:
        status = "requires_confirmation" if payment_method else "requires_payment_method"
        return 200, state.put(p.stripe_payment_intent(status=status, **fields)), []

    decline = state.declines.get(payment_method)
    charge = None
    if decline is None or decline[0] != "authentication_required":
        failure = decline[0] if decline else None
        charge = _new_charge(
            state,
            pi_id=pi_id,
            amount=amount,
            currency=currency,
            customer=customer,
            payment_method=payment_method,
            metadata=metadata,
            failure=failure,
        )
    latest_charge = charge["id"] if charge else None
    if decline is None:
        intent = state.put(p.stripe_payment_intent(latest_charge=latest_charge, **fields))
        event = state.emit("payment_intent.succeeded", intent, request_info=request_info)
        return 200, intent, [event]

    code, decline_code = decline
    error = {
        "code": code,
        "decline_code": decline_code,
        "doc_url": _doc_url(code),
        "message": _CARD_ERROR_MESSAGES.get(code, "Your card was declined."),
        "payment_method": p.stripe_payment_method(pm_id=payment_method, customer=customer),
        "type": "card_error",
    }
    if charge:
        error["charge"] = charge["id"]
    intent = state.put(
        p.stripe_payment_intent(
            status="requires_payment_method",
            latest_charge=latest_charge,
            last_payment_error=error,
            **fields,
        )
    )
    body = {
        "error": {
            **error,
            "payment_intent": intent,
            "request_log_url": f"https://dashboard.stripe.com/test/logs/{request_info['id']}",
        }
    }
    event = state.emit("payment_intent.payment_failed", intent, request_info=request_info)
    return 402, body, [event]


def _succeeded_charge(state, pi_id):
    """The successful charge behind a PaymentIntent, which refunds and disputes act on."""
    intent = state.get("payment_intent", pi_id, "payment_intent")
    charge = state.store["charge"].get(intent["latest_charge"] or "")
    if intent["status"] != "succeeded" or charge is None:
        raise _invalid(f"PaymentIntent {pi_id} has no successful charge.", param="payment_intent")
    return intent, charge


def _refund(state, body):
    """Refund (part of) a PaymentIntent's charge: the charge's amount_refunded grows and
    `charge.refunded` plus `refund.created` are raised."""
    intent, charge = _succeeded_charge(state, _required(body, "payment_intent"))
    remaining = charge["amount"] - charge["amount_refunded"]
    amount = _int(body.get("amount", remaining), "amount", minimum=1)
    if amount > remaining:
        raise _invalid(
            f"Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining}).",
            param="amount",
            code="amount_too_large",
        )
    refund = state.put(
        p.stripe_refund(
            refund_id=p.stripe_id("re"),
            payment_intent=intent["id"],
            charge=charge["id"],
            amount=amount,
            currency=charge["currency"],
            reason=body.get("reason"),
        )
    )
    charge["amount_refunded"] += amount
    charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
    charge["refunds"]["data"].insert(0, refund)
    charge["refunds"]["total_count"] += 1
    events = [state.emit("charge.refunded", charge), state.emit("refund.created", refund)]
    return {"refund": refund, "charge": charge}, events


def _dispute(state, body):
    """Open a chargeback on a PaymentIntent's charge: funds are withdrawn at once, raising
    `charge.dispute.created` and `charge.dispute.funds_withdrawn`."""
    intent, charge = _succeeded_charge(state, _required(body, "payment_intent"))
    amount = _int(body.get("amount", charge["amount"]), "amount", minimum=1)
    dispute_id = p.stripe_id("dp")
    withdrawal = p.stripe_balance_transaction(
        txn_id=p.stripe_id("txn"),
        amount=-amount,
        currency=charge["currency"],
        source=dispute_id,
        reporting_category="dispute",
        fee=_DISPUTE_FEE,
        description=f"Chargeback withdrawal for {charge['id']}",
    )
    dispute = state.put(
        p.stripe_dispute(
            dispute_id=dispute_id,
            payment_intent=intent["id"],
            charge=charge["id"],
            amount=amount,
            currency=charge["currency"],
            reason=body.get("reason", "fraudulent"),
            balance_transactions=[withdrawal],
        )
    )
    charge["disputed"] = True
    events = [
        state.emit("charge.dispute.created", dispute),
        state.emit("charge.dispute.funds_withdrawn", dispute),
    ]
    return dispute, events


def _close_dispute(state, dispute_id, body):
    """Close a dispute as won or lost: `charge.dispute.closed`, plus
    `charge.dispute.funds_reinstated` (with the reversal transaction) when won."""
    dispute = state.get("dispute", dispute_id, "dispute")
    outcome = body.get("status")
    if outcome not in ("won", "lost"):
        raise _invalid("status must be 'won' or 'lost'.", param="status")
    if dispute["status"] in ("won", "lost"):
        raise _invalid(f"Dispute {dispute_id} is already {dispute['status']}.")
    dispute["status"] = outcome
    if outcome == "won":
        dispute["balance_transactions"].append(
            p.stripe_balance_transaction(
                txn_id=p.stripe_id("txn"),
                amount=dispute["amount"],
                currency=dispute["currency"],
                source=dispute_id,
                reporting_category="dispute_reversal",
                description=f"Chargeback reversal for {dispute['charge']}",
            )
        )
    events = [state.emit("charge.dispute.closed", dispute)]
    if outcome == "won":
        events.append(state.emit("charge.dispute.funds_reinstated", dispute))
    return dispute, events


# --------------------------------------------------------------------------- webhooks


def _deliver(state, events):
    """POST each event, signed, to the webhook endpoint unless delivery is paused or the
    seeded dropper skips it; failures are recorded, never raised."""
    for event in events:
        with state.lock:
            url, secret = state.webhook_url, state.webhook_secret
            if not url or not secret:
                continue
            if not state.deliver or state.rng.random() < state.drop_ratio:
                state.webhooks["paused" if not state.deliver else "dropped"] += 1
                state.undelivered[event["id"]] = None
                continue
            state.webhooks["attempted"] += 1
            body = json.dumps(event).encode("utf-8")
            timeout = state.delivery_timeout
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Signature": p.sign_stripe(body, secret),
        }
        try:
            response = requests.post(url, data=body, headers=headers, timeout=timeout)
            error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            error = repr(exc)
        with state.lock:
            if error is None:
                state.webhooks["delivered"] += 1
                state.undelivered.pop(event["id"], None)
                event["pending_webhooks"] = 0
            else:
                state.webhooks["failed"] += 1
                state.webhook_errors.append({"event": event["id"], "error": error})
                state.undelivered[event["id"]] = None


# --------------------------------------------------------------------------- the app


def create_app(webhook_url=None, webhook_secret=None):
    """Build the fake. Stripe API (Bearer sk_/rk_ key, form bodies, JSON answers):

    POST /v1/checkout/sessions, GET /v1/checkout/sessions[/<id>],
    POST /v1/payment_intents, GET /v1/payment_intents[/<id>],
    GET /v1/events[/<id>] (filters type, types[], created[gt|gte|lt|lte]).

    Control API (JSON in and out):
    POST /_control/decline        {"payment_method", "code": "card_declined" |
                                   "authentication_required" | ... | null to clear,
                                   "decline_code"?}
    POST /_control/fail           {"count": 1, "status": 500 | 429, "path_prefix"?: "/v1/",
                                   "retry_after"?: seconds, "should_retry"?: bool}
    POST /_control/complete_session/<cs_id>  {"customer"?, "payment_method"?, "email"?}
    POST /_control/refund         {"payment_intent", "amount"?, "reason"?}
    POST /_control/dispute        {"payment_intent", "amount"?, "reason"?}
    POST /_control/dispute_close/<dp_id>     {"status": "won" | "lost"}
    POST /_control/insert_event   {"type", "data": {"object"}, "id"?, "created"?,
                                   "previous_attributes"?}
    POST /_control/webhooks       {"url"?, "secret"?, "deliver"?, "drop_ratio"?, "seed"?,
                                   "timeout"?}
    POST /_control/redeliver      {"event_ids"?: [...]}  (default: every undelivered event)
    GET  /_control/events, GET /_control/stats, POST /_control/reset
    """
    app = Flask(__name__)
    state = _State(webhook_url, webhook_secret)

    def respond(body, status=200, headers=None):
        """A JSON response rendered now, so later state changes cannot leak into it."""
        return app.response_class(
            json.dumps(body), status=status, mimetype="application/json", headers=headers
        )

    def params():
        """Query string (GET) or form body (POST) as nested Stripe parameters."""
        source = request.args if request.method == "GET" else request.form
        return _nest(source.items(multi=True))

    def request_info():
        """The `request` hash events raised by this API call carry."""
        return {"id": g.request_id, "idempotency_key": request.headers.get("Idempotency-Key")}

    def endpoint_key():
        """Stats key: method plus route rule, e.g. "POST /v1/payment_intents"."""
        rule = request.url_rule.rule if request.url_rule else request.path
        return f"{request.method} {rule}"

    @app.errorhandler(ApiError)
    def api_error(exc):
        """Render ApiError as Stripe's JSON error with its status."""
        return respond(exc.body, exc.status)

    @app.errorhandler(404)
    @app.errorhandler(405)
    def unknown_route(exc):
        """Answer unknown URLs in Stripe's JSON, which the SDK can parse."""
        message = f"Unrecognized request URL ({request.method}: {request.path})."
        return respond({"error": {"type": "invalid_request_error", "message": message}}, exc.code)

    @app.before_request
    def gatekeeper():
        """Auth, injected outages and idempotent replay, in the order Stripe applies them."""
        if not request.path.startswith("/v1/"):
            return None
        g.request_id = p.stripe_id("req", 14)
        key = endpoint_key()
        with state.lock:
            state.endpoints[key]["calls"] += 1
        auth = request.headers.get("Authorization", "")
        if not re.fullmatch(r"Bearer (sk|rk)_\w+", auth):
            raise _invalid("Invalid API Key provided.", status=401)
        with state.lock:
            rule = next(
                (
                    f
                    for f in state.failures
                    if f["remaining"] > 0 and request.path.startswith(f["path_prefix"])
                ),
                None,
            )
            if rule:
                rule["remaining"] -= 1
                state.injected_failures += 1
        if rule:
            return injected_failure(rule)
        idempotency_key = request.headers.get("Idempotency-Key")
        if request.method != "POST" or not idempotency_key:
            return None
        fingerprint = json.dumps([request.path, sorted(request.form.items(multi=True))])
        with state.lock:
            saved = state.idempotency.get(idempotency_key)
            if saved is None:
                state.idempotency[idempotency_key] = {"fingerprint": fingerprint, "body": None}
                g.idempotency_key = idempotency_key
                return None
            if saved["fingerprint"] != fingerprint:
                raise ApiError(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with. Try using a key other than "
                    f"'{idempotency_key}' if you meant to execute a different request.",
                )
            if saved["body"] is None:
                raise _invalid(
                    "There is currently another in-progress request using this Idempotent "
                    "Key. Please try again later.",
                    code="idempotency_key_in_use",
                    status=409,
                )
            state.endpoints[key]["replayed"] += 1
        return respond(
            saved["body"],
            saved["status"],
            {"Idempotent-Replayed": "true", "Idempotency-Key": idempotency_key},
        )

    def injected_failure(rule):
        """The response for an injected outage: a 500 api_error or a 429 rate limit."""
        headers = {}
        if rule.get("retry_after") is not None:
            headers["Retry-After"] = str(rule["retry_after"])
        if rule.get("should_retry") is not None:
            headers["Stripe-Should-Retry"] = "true" if rule["should_retry"] else "false"
        if rule["status"] == 429:
            error = {
                "type": "invalid_request_error",
                "code": "rate_limit",
                "message": "Request rate limit exceeded. Learn more about rate limits here "
                "https://stripe.com/docs/rate-limits.",
            }
        else:
            error = {"type": "api_error", "message": "An unknown error occurred"}
        return respond({"error": error}, rule["status"], headers)

    @app.after_request
    def bookkeeping(response):
        """Save replayable outcomes under their Idempotency-Key and count results."""
        if not request.path.startswith("/v1/"):
            return response
        response.headers["Request-Id"] = g.get("request_id", "")
        key = endpoint_key()
        idempotency_key = g.pop("idempotency_key", None)
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        with state.lock:
            if idempotency_key:
                response.headers["Idempotency-Key"] = idempotency_key
                saved = state.idempotency.get(idempotency_key)  # gone if reset meanwhile
                if saved is not None and response.status_code in _REPLAYABLE:
                    saved.update(body=response.get_json(), status=response.status_code)
                else:
                    state.idempotency.pop(idempotency_key, None)
            if response.status_code >= 400 and not replayed:
                state.endpoints[key]["failed"] += 1
            elif request.method == "POST" and not replayed:
                state.endpoints[key]["created"] += 1
        return response

    @app.teardown_request
    def release_key(_exc):
        """Free an Idempotency-Key whose request crashed before a response was saved."""
        idempotency_key = g.pop("idempotency_key", None)
        if idempotency_key:
            with state.lock:
                if state.idempotency.get(idempotency_key, {}).get("body") is None:
                    state.idempotency.pop(idempotency_key, None)

    # ---- Stripe API

    @app.post("/v1/checkout/sessions")
    def create_session():
        """Create an open Checkout Session."""
        args = params()
        with state.lock:
            session = copy.deepcopy(_create_session(state, args))
        return respond(session)

    @app.post("/v1/checkout/sessions/<session_id>/expire")
    def expire_session(session_id):
        """Expire an open Checkout Session."""
        with state.lock:
            session, events = _expire_session(state, session_id)
            session = copy.deepcopy(session)
        _deliver(state, events)
        return respond(session)

    @app.get("/v1/checkout/sessions/<session_id>")
    def retrieve_session(session_id):
        """Retrieve a Checkout Session, honouring expand[]."""
        args = params()
        with state.lock:
            return respond(_expand(state, state.get("checkout.session", session_id, "session"), args))

    @app.get("/v1/checkout/sessions")
    def list_sessions():
        """List Checkout Sessions (filters: customer, payment_intent, status)."""
        args = params()
        with state.lock:
            items = [
                s
                for s in state.store["checkout.session"].values()
                if all(s[f] == args[f] for f in ("customer", "payment_intent", "status") if f in args)
            ]
            return respond(_page(state, "checkout.session", items, "/v1/checkout/sessions", args))

    @app.post("/v1/payment_intents")
    def create_payment_intent():
        """Create (and with confirm=true, charge) a PaymentIntent."""
        args = params()
        with state.lock:
            status, body, events = _create_payment_intent(state, args, request_info())
            body = copy.deepcopy(body)
        _deliver(state, events)
        return respond(body, status)

    @app.get("/v1/payment_intents/<pi_id>")
    def retrieve_payment_intent(pi_id):
        """Retrieve a PaymentIntent, honouring expand[]."""
        args = params()
        with state.lock:
            return respond(_expand(state, state.get("payment_intent", pi_id, "intent"), args))

    @app.get("/v1/payment_intents")
    def list_payment_intents():
        """List PaymentIntents (filter: customer)."""
        args = params()
        with state.lock:
            items = [
                pi
                for pi in state.store["payment_intent"].values()
                if "customer" not in args or pi["customer"] == args["customer"]
            ]
            return respond(_page(state, "payment_intent", items, "/v1/payment_intents", args))

    @app.get("/v1/events/<event_id>")
    def retrieve_event(event_id):
        """Retrieve one event."""
        with state.lock:
            return respond(state.get("event", event_id, "id"))

    @app.get("/v1/events")
    def list_events():
        """List events (filters: type with * wildcards, types[], created)."""
        args = params()
        patterns = args.get("types") or ([args["type"]] if "type" in args else [])
        if not isinstance(patterns, list):
            raise _invalid("Invalid array", param="types")
        with state.lock:
            items = [
                e
                for e in state.store["event"].values()
                if not patterns or any(fnmatch.fnmatchcase(e["type"], pat) for pat in patterns)
            ]
            return respond(_page(state, "event", items, "/v1/events", args))

    # ---- control API

    def control_body():
        """The JSON body of a control call ({} when empty)."""
        return request.get_json(silent=True) or {}

    @app.post("/_control/decline")
    def control_decline():
        """Make a payment method decline (or, with code null, succeed again)."""
        body = control_body()
        payment_method = _required(body, "payment_method")
        with state.lock:
            if body.get("code") is None:
                state.declines.pop(payment_method, None)
            else:
                decline_code = body.get("decline_code") or (
                    "authentication_required"
                    if body["code"] == "authentication_required"
                    else "generic_decline"
                )
                state.declines[payment_method] = (body["code"], decline_code)
        return respond({"payment_method": payment_method, "code": body.get("code")})

    @app.post("/_control/fail")
    def control_fail():
        """Queue injected 500/429 answers for the next matching requests."""
        body = control_body()
        rule = {
            "remaining": _int(body.get("count", 1), "count", minimum=1),
            "status": _int(body.get("status", 500), "status"),
            "path_prefix": body.get("path_prefix", "/v1/"),
            "retry_after": body.get("retry_after"),
            "should_retry": body.get("should_retry"),
        }
        with state.lock:
            state.failures.append(rule)
        return respond(rule)

    @app.post("/_control/complete_session/<session_id>")
    def control_complete_session(session_id):
        """Play the customer paying a Checkout Session."""
        body = control_body()
        with state.lock:
            result, events = _complete_session(state, session_id, body)
            result = copy.deepcopy({**result, "events": [e["id"] for e in events]})
        _deliver(state, events)
        return respond(result)

    @app.post("/_control/refund")
    def control_refund():
        """Refund a PaymentIntent's charge, as from the Dashboard."""
        body = control_body()
        with state.lock:
            result, events = _refund(state, body)
            result = copy.deepcopy({**result, "events": [e["id"] for e in events]})
        _deliver(state, events)
        return respond(result)

    @app.post("/_control/dispute")
    def control_dispute():
        """Open a chargeback on a PaymentIntent's charge."""
        body = control_body()
        with state.lock:
            dispute, events = _dispute(state, body)
            result = copy.deepcopy({"dispute": dispute, "events": [e["id"] for e in events]})
        _deliver(state, events)
        return respond(result)

    @app.post("/_control/dispute_close/<dispute_id>")
    def control_dispute_close(dispute_id):
        """Close a dispute as won or lost."""
        body = control_body()
        with state.lock:
            dispute, events = _close_dispute(state, dispute_id, body)
            result = copy.deepcopy({"dispute": dispute, "events": [e["id"] for e in events]})
        _deliver(state, events)
        return respond(result)

    @app.post("/_control/insert_event")
    def control_insert_event():
        """Store (and deliver) an arbitrary event, e.g. old or odd ones."""
        body = control_body()
        event_id = body.get("id") or p.stripe_id("evt")
        with state.lock:
            if event_id in state.store["event"]:
                raise _invalid(f"Event {event_id} already exists.", param="id")
            event = state.put(
                p.stripe_event(
                    event_id=event_id,
                    event_type=_required(body, "type"),
                    data_object=(body.get("data") or {}).get("object", {}),
                    created=body.get("created"),
                    previous_attributes=body.get("previous_attributes"),
                    pending_webhooks=1 if state.webhook_url else 0,
                )
            )
            result = copy.deepcopy(event)
        _deliver(state, [event])
        return respond(result)

    @app.post("/_control/webhooks")
    def control_webhooks():
        """Reconfigure webhook delivery: endpoint, pause, drop ratio, seed."""
        body = control_body()
        with state.lock:
            state.webhook_url = body.get("url", state.webhook_url)
            state.webhook_secret = body.get("secret", state.webhook_secret)
            state.deliver = bool(body.get("deliver", state.deliver))
            state.drop_ratio = float(body.get("drop_ratio", state.drop_ratio))
            state.delivery_timeout = float(body.get("timeout", state.delivery_timeout))
            if "seed" in body:
                state.rng = random.Random(body["seed"])
            config = {
                "url": state.webhook_url,
                "deliver": state.deliver,
                "drop_ratio": state.drop_ratio,
                "timeout": state.delivery_timeout,
            }
        return respond(config)

    @app.post("/_control/redeliver")
    def control_redeliver():
        """Resend chosen events, or every undelivered one, like 'Resend'."""
        body = control_body()
        with state.lock:
            ids = body.get("event_ids") or list(state.undelivered)
            events = [state.get("event", event_id, "event_ids") for event_id in ids]
        _deliver(state, events)
        return respond({"event_ids": ids})

    @app.post("/_control/prune_idempotency_keys")
    def control_prune_idempotency_keys():
        """A day has passed: Stripe may prune keys once they are 24 hours old, and a reused
        key then makes a new request (https://docs.stripe.com/idempotency)."""
        with state.lock:
            pruned = len(state.idempotency)
            state.idempotency.clear()
        return respond({"pruned": pruned})

    @app.get("/_control/events")
    def control_events():
        """Every stored event, oldest first."""
        with state.lock:
            events = sorted(state.store["event"].values(), key=state.sort_key)
            return respond(events)

    @app.get("/_control/stats")
    def control_stats():
        """Per-endpoint call counts, object counts and webhook outcomes."""
        with state.lock:
            return respond(
                {
                    "endpoints": {
                        key: {n: c[n] for n in ("calls", "created", "replayed", "failed")}
                        for key, c in state.endpoints.items()
                    },
                    "objects": {kind: len(objs) for kind, objs in state.store.items()},
                    "injected_failures": state.injected_failures,
                    "webhooks": {
                        **{
                            n: state.webhooks[n]
                            for n in ("attempted", "delivered", "failed", "dropped", "paused")
                        },
                        "errors": state.webhook_errors,
                        "undelivered": list(state.undelivered),
                    },
                }
            )

    @app.post("/_control/reset")
    def control_reset():
        """Forget all state but the webhook endpoint."""
        with state.lock:
            state.reset()
        return respond({"reset": True})

    return app
