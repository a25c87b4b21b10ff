"""Bounded retries with exponential backoff: provider API calls made by jobs (a 429 or a 5xx is
retried a few times, honouring Retry-After, then the job fails and is resumed later), and the
shim's database calls that PostgreSQL rolled back as a serialization failure or a deadlock."""

import logging
import time
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)


class RetryableError(Exception):
    """A provider answered 429 or 5xx: worth another try after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def with_backoff(
    call: Callable,
    *,
    retryable: tuple[type[BaseException], ...],
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 10.0,
):
    """Run call(); on a retryable error wait base_delay x 2^n (or Retry-After), at most
    `attempts` times in all, then let the last error through."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except retryable as exc:
            if attempt == attempts:
                raise
            hinted = getattr(exc, "retry_after", None)
            delay = min(max_delay, hinted if hinted is not None else base_delay * 2 ** (attempt - 1))
            log.warning("transient (%s); attempt %d/%d, retrying in %.2fs", exc, attempt, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


# PostgreSQL rolls the whole transaction back for these and advises retrying all of it
# (https://www.postgresql.org/docs/current/mvcc-serialization-failure-handling.html).
ROLLED_BACK = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)


def with_connection(pool, work: Callable, attempts: int = 3):
    """work(conn) on a pooled connection, run again (on a fresh checkout) when PostgreSQL rolled
    its transaction back with 40001 or 40P01, or refused it on a read-only session (25006, whose
    session is closed first). `work` must be one whole transaction (one autocommit statement, or
    a conn.transaction() block) so that a retry repeats all of it; when the attempts run out the
    error reaches shim.http_errors, which answers 503 with Retry-After."""

    def attempt():
        with pool.connection() as conn:
            try:
                return work(conn)
            except psycopg.errors.ReadOnlySqlTransaction:
                # 25006: a session that began while the database took no writes (a standby after a
                # failover, default_transaction_read_only) stays read-only for its whole life.
                # Closed, the pool opens a fresh one for the next request, which writes once the
                # database does again.
                conn.close()
                raise

    return with_backoff(
        attempt,
        retryable=(*ROLLED_BACK, psycopg.errors.ReadOnlySqlTransaction),
        attempts=attempts,
        base_delay=0.05,
        max_delay=0.5,
    )
