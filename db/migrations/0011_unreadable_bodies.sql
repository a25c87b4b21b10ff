-- Signed bodies PostgreSQL cannot hold as jsonb (a \u0000 escape, a lone surrogate, NaN, a shape
-- no handler reads) were answered 500 and lost. They are now stored as received, for an operator.

-- The body exactly as received, kept only when it could not be stored as `payload` (then null).
ALTER TABLE billing.webhook_events
  ADD COLUMN raw_body text,
  ALTER COLUMN payload DROP NOT NULL,
  ADD CONSTRAINT webhook_events_payload_or_raw_body CHECK (payload IS NOT NULL OR raw_body IS NOT NULL);

-- A provider object reconciliation could not read or apply: recorded, and the run goes on.
ALTER TABLE billing.discrepancies DROP CONSTRAINT discrepancies_kind_check;
ALTER TABLE billing.discrepancies ADD CONSTRAINT discrepancies_kind_check
  CHECK (kind IN ('phantom', 'amount_mismatch', 'duration_mismatch', 'unattributed', 'currency_mismatch',
                  'unchargeable', 'unsettled_sms', 'attribution_mismatch', 'other_org', 'call_not_ended',
                  'unreadable'));

-- How many such objects a run met.
ALTER TABLE billing.reconciliation_runs
  ADD COLUMN unreadable integer NOT NULL DEFAULT 0;
