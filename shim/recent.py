"""A value computed at most once per `max_age` seconds, shared by the threads of a process."""

import threading
import time
from collections.abc import Callable


class Recent:
    """fn()'s latest outcome (its value, or the exception it raised), reused while younger than
    max_age. One caller computes while the others wait for its outcome, so a burst of callers
    costs one call, not one each."""

    def __init__(self, fn: Callable, max_age: float, clock: Callable[[], float] = time.monotonic):
        self.fn, self.max_age, self.clock = fn, max_age, clock
        self._lock = threading.Lock()
        self._computed_at: float | None = None
        self._outcome: tuple = (None, None)

    def __call__(self):
        with self._lock:
            if self._computed_at is None or self.clock() - self._computed_at >= self.max_age:
                try:
                    self._outcome = (self.fn(), None)
                except Exception as exc:  # remembered too: a failing database is not asked per caller
                    self._outcome = (None, exc)
                self._computed_at = self.clock()
            value, error = self._outcome
        if error is not None:
            raise error
        return value
