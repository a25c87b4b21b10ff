"""Outage injection and request counters for the fakes of read-only provider APIs (Vapi's
GET /call, Twilio's Message fetch): `/_control/fail` arms the next n API requests with an HTTP
status, and every API request is counted, as are those refused for bad credentials."""

import threading


class Outages:
    """One fake's armed outage and its counters, behind their own lock."""

    def __init__(self, default_status: int):
        self.default_status = default_status
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """No outage armed, every counter at zero."""
        with self.lock:
            self.remaining, self.status = 0, self.default_status
            self.requests = self.injected_failures = self.unauthorized = 0

    def arm(self, body: dict) -> dict:
        """The body of POST /_control/fail: {"count": n, "status": s}."""
        with self.lock:
            self.remaining = int(body.get("count", 1))
            self.status = int(body.get("status", self.default_status))
        return body

    def admit(self, authorized: bool) -> int | None:
        """Count one API request; the status to fail it with when an outage is armed (which
        comes before the credentials check, as at the providers), else None."""
        with self.lock:
            self.requests += 1
            if self.remaining > 0:
                self.remaining -= 1
                self.injected_failures += 1
                return self.status
            self.unauthorized += not authorized
            return None

    def counters(self) -> dict:
        with self.lock:
            return {
                "requests": self.requests,
                "injected_failures": self.injected_failures,
                "unauthorized": self.unauthorized,
            }
