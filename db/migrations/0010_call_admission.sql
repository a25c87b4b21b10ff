-- Call admission (P0-3 where calls happen): an inbound call is admitted before it is answered,
-- sized to what the wallet affords; every call's hold says how long it may run and who ends it
-- at that length; calls the wallet cannot pay are ended through Vapi's Live Call Control.

-- What api.admit_call answers: the seconds the call may run, and the hold that pays for them.
CREATE TYPE api.admission AS (
  status               text,
  max_duration_seconds integer,
  amount_minor         bigint,
  balance_minor        bigint,
  reason               text
);

-- The org's maximum call length (null: the operator's default), and the operator's settings:
-- the default maximum, the shortest call worth admitting, how long before a hold runs out the
-- worker ends a call it must end itself (at least one worker pass), how soon a failed end-call
-- is tried again, and the sentence Vapi speaks to a caller who is refused.
ALTER TABLE billing.wallets
  ADD COLUMN max_call_minutes integer CHECK (max_call_minutes BETWEEN 1 AND 720);
ALTER TABLE billing.settings
  ADD COLUMN max_call_minutes integer NOT NULL DEFAULT 60 CHECK (max_call_minutes BETWEEN 1 AND 720),
  ADD COLUMN min_call_seconds integer NOT NULL DEFAULT 60 CHECK (min_call_seconds BETWEEN 10 AND 43200),
  ADD COLUMN call_end_lead interval NOT NULL DEFAULT interval '15 seconds',
  ADD COLUMN call_end_retry interval NOT NULL DEFAULT interval '10 seconds',
  ADD COLUMN call_refused_message text NOT NULL
    DEFAULT 'Sorry, this line cannot take calls right now. Please try again later.'
    CHECK (length(call_refused_message) BETWEEN 1 AND 500);

-- A call hold now knows how many seconds it pays for and who stops the call there: Vapi (the
-- admission's maxDurationSeconds) or this system (through the call's control URL).
ALTER TABLE billing.holds
  ADD COLUMN max_duration_seconds integer CHECK (max_duration_seconds BETWEEN 1 AND 43200),
  ADD COLUMN enforced_by text CHECK (enforced_by IN ('vapi', 'control_url')),
  ADD COLUMN control_url text CHECK (length(control_url) <= 2048);
-- The worker looks for calls it must end: open holds it enforces, by when they run out.
CREATE INDEX holds_control_url_idx ON billing.holds (created_at)
  WHERE status = 'open' AND enforced_by = 'control_url';

-- Which assistant answers an inbound call to a phone number (set with the number's route).
ALTER TABLE billing.vapi_routes
  ADD COLUMN assistant_id text CHECK (length(assistant_id) BETWEEN 1 AND 255);

-- Calls this system must end (refused when they started, or about to outrun their hold): one row
-- per call, so a call is ended once; every attempt is counted and its error kept.
CREATE TABLE billing.call_end_requests (
  call_id         text PRIMARY KEY CHECK (length(call_id) BETWEEN 1 AND 255),
  org_id          uuid NOT NULL REFERENCES billing.wallets (org_id),
  reason          text NOT NULL CHECK (reason IN ('refused', 'hold_exhausted')),
  control_url     text CHECK (length(control_url) <= 2048),
  status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'ended', 'failed')),
  attempts        integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  last_error      text,
  next_attempt_at timestamptz,
  created_at      timestamptz NOT NULL DEFAULT now(),
  ended_at        timestamptz,
  CHECK ((status = 'ended') = (ended_at IS NOT NULL))
);
CREATE INDEX call_end_requests_due_idx ON billing.call_end_requests (next_attempt_at)
  WHERE status = 'pending';

-- Nothing is settled silently: an event that meets another org's entry is stored as 'conflict'
-- (terminal, and a discrepancy), and a call charged to the server's org against what the
-- caller's metadata claimed is a discrepancy too.
ALTER TABLE billing.webhook_events DROP CONSTRAINT webhook_events_status_check;
ALTER TABLE billing.webhook_events ADD CONSTRAINT webhook_events_status_check
  CHECK (status IN ('processed', 'ignored', 'failed', 'dead', 'unattributed', 'conflict'));
ALTER TABLE billing.discrepancies DROP CONSTRAINT discrepancies_kind_check;
ALTER TABLE billing.discrepancies ADD CONSTRAINT discrepancies_kind_check
  CHECK (kind IN ('phantom', 'amount_mismatch', 'duration_mismatch', 'unattributed', 'currency_mismatch',
                  'unchargeable', 'unsettled_sms', 'attribution_mismatch', 'other_org', 'call_not_ended'));
