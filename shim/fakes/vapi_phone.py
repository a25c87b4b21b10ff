"""The calling side of the fake Vapi: it places simulated calls and sends their server messages
to the shim the way Vapi does (signed with X-Vapi-Secret, every message checked against the SDK's
types), honours the admission it is answered with, and ends calls on Live Call Control.

- Inbound: an `assistant-request` first; an `{"error"}` answer ends the call unanswered
  (`assistant-request-returned-error`); an admitted call runs at most its
  `assistantOverrides.maxDurationSeconds` and then ends `exceeded-max-duration`.
- Web and outbound calls: a `status-update` `in-progress`, then the report when the caller hangs
  up, or when `end-call` arrives on the call's control URL (`manually-canceled`), whichever is
  first. Talk time is simulated: a call that "talked" 30 minutes is reported at once, its
  startedAt that far in the past.
"""

import threading
from datetime import UTC, datetime, timedelta

import requests

from shim.fakes import payloads
from shim.fakes.vapi_types import check_assistant_answer

SEND_TIMEOUT_SECONDS = 10


class Phone:
    """Calls in flight and the server they report to."""

    def __init__(self, record):
        self.record = record  # keeps every call the phone knows for GET /call
        self.control_base = None
        self.server_url = None
        self.secret = None
        self.lock = threading.Lock()
        self.live = {}  # call id -> {"call", "talk_seconds", "cap"}
        self.end_requests = []  # every end-call received: [call id, ...]
        self.http = requests.Session()

    def send(self, payload: dict) -> requests.Response:
        """POST one server message to the shim, as Vapi's server URL credential signs it."""
        if not self.server_url:
            raise RuntimeError("no server URL: POST /_control/server first")
        return self.http.post(
            self.server_url,
            json=payload,
            headers={"X-Vapi-Secret": self.secret},
            timeout=SEND_TIMEOUT_SECONDS,
        )

    def _new_call(self, call_type, *, assistant_id=None, phone_number_id=None, overrides=None):
        call = payloads.vapi_call(
            status="ringing" if call_type == "inboundPhoneCall" else "in-progress",
            started_at=None,
            call_type=call_type,
            assistant_id=assistant_id,
            phone_number_id=phone_number_id,
        )
        call["monitor"]["controlUrl"] = f"{self.control_base}/control/{call['id']}"
        if overrides:
            call["assistantOverrides"] = overrides
        return call

    def _run(self, call: dict, talk_seconds: float, cap: float | None) -> dict:
        """The call connects now: in-progress, then (unless it is held open) its report."""
        now = datetime.now(UTC)
        call.update(status="in-progress", startedAt=payloads.vapi_iso(now))
        with self.lock:
            self.live[call["id"]] = {"call": call, "talk_seconds": talk_seconds, "cap": cap}
        in_progress = self.send(payloads.vapi_status_update(dict(call), "in-progress"))
        with self.lock:
            still_live = call["id"] in self.live
        if still_live and talk_seconds is not None:
            self.hang_up(call["id"], talk_seconds, "customer-ended-call")
        return {"call_id": call["id"], "in_progress_status": in_progress.status_code}

    def hang_up(self, call_id: str, seconds: float, ended_reason: str) -> dict | None:
        """End a live call after `seconds` of talk (Vapi cuts it at its maxDurationSeconds) and
        send its end-of-call report."""
        with self.lock:
            entry = self.live.pop(call_id, None)
        if entry is None:
            return None
        if entry["cap"] is not None and seconds > entry["cap"]:
            seconds, ended_reason = entry["cap"], "exceeded-max-duration"
        return self._report(entry["call"], seconds, ended_reason)

    def _report(self, call: dict, seconds: float, ended_reason: str) -> dict:
        """The ended call's end-of-call report, sent to the server."""
        started = datetime.now(UTC) - timedelta(seconds=seconds)
        ended = payloads.vapi_call(
            call_id=call["id"],
            started_at=started,
            ended_at=started + timedelta(seconds=seconds),
            ended_reason=ended_reason,
            call_type=call["type"],
            assistant_id=call.get("assistantId"),
            phone_number_id=call.get("phoneNumberId"),
            overrides_metadata=(call.get("assistantOverrides") or {}).get("metadata"),
        )
        if call.get("assistantOverrides"):
            ended["assistantOverrides"] = call["assistantOverrides"]
        ended["monitor"] = call["monitor"]
        self.record(ended)
        self.send(payloads.vapi_end_of_call_report(ended))
        return ended

    def inbound(self, phone_number_id: str, talk_seconds: float) -> dict:
        """An inbound call to a number whose assistant is chosen by the server."""
        call = self._new_call("inboundPhoneCall", phone_number_id=phone_number_id)
        answer = self.send(payloads.vapi_assistant_request(call))
        body = answer.json() if answer.headers.get("Content-Type", "").startswith("application/json") else {}
        if answer.status_code != 200 or "error" in body or "assistantId" not in body:
            refused = self._refused(call, "assistant-request-returned-error")
            return {"call_id": call["id"], "status": answer.status_code, "answer": body, "refused": refused}
        check_assistant_answer(body)
        call["assistantId"] = body["assistantId"]
        call["assistantOverrides"] = body.get("assistantOverrides") or {}
        cap = call["assistantOverrides"].get("maxDurationSeconds")
        ran = self._run(call, talk_seconds, cap)
        return {**ran, "status": answer.status_code, "answer": body, "refused": False}

    def _refused(self, call: dict, ended_reason: str) -> bool:
        """A call that never connected: its report has no startedAt."""
        ended = payloads.vapi_call(
            call_id=call["id"],
            ended_at=datetime.now(UTC),
            ended_reason=ended_reason,
            call_type=call["type"],
            phone_number_id=call.get("phoneNumberId"),
        )
        ended["monitor"] = call["monitor"]
        self.record(ended)
        self.send(payloads.vapi_end_of_call_report(ended))
        return True

    def web_call(self, assistant_id: str, talk_seconds, metadata=None) -> dict:
        """A browser call started with Vapi's public key: no admission, the caller's metadata.
        talk_seconds None keeps it open until end-call (or hang_up)."""
        overrides = {"metadata": metadata} if metadata is not None else None
        call = self._new_call("webCall", assistant_id=assistant_id, overrides=overrides)
        return self._run(call, talk_seconds, None)

    def create(self, call: dict):
        """A call created with POST /call (queued until `run`)."""
        call["monitor"]["controlUrl"] = f"{self.control_base}/control/{call['id']}"
        with self.lock:
            self.live[call["id"]] = {"call": call, "talk_seconds": None, "cap": None, "queued": True}

    def run_queued(self, call_id: str, talk_seconds: float) -> dict:
        """The created call is answered and talks `talk_seconds` (at most its maxDurationSeconds)."""
        with self.lock:
            entry = self.live.pop(call_id)
        call = entry["call"]
        cap = (call.get("assistantOverrides") or {}).get("maxDurationSeconds")
        return self._run(call, talk_seconds, cap)

    def end_call(self, call_id: str) -> bool:
        """Live Call Control's end-call: the call ends now; False when it is not live."""
        with self.lock:
            self.end_requests.append(call_id)
            entry = self.live.pop(call_id, None)
        if entry is None or entry.get("queued"):
            return False
        started = datetime.fromisoformat(entry["call"]["startedAt"])
        talked = max(1.0, (datetime.now(UTC) - started).total_seconds())
        # Vapi sends the report after the call has ended, not inside the control request.
        threading.Thread(
            target=self._report, args=(entry["call"], talked, "manually-canceled"), daemon=True
        ).start()
        return True
