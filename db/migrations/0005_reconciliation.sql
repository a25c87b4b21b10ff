-- Reconciliation runs against Stripe and Vapi and what they found that does not add up.

CREATE TABLE billing.reconciliation_runs (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  provider        text NOT NULL CHECK (provider IN ('stripe', 'vapi')),
  window_start    timestamptz NOT NULL,
  window_end      timestamptz NOT NULL CHECK (window_end > window_start),
  status          text NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'completed', 'failed')),
  resume_cursor   timestamptz,
  seen            integer NOT NULL DEFAULT 0,
  already_applied integer NOT NULL DEFAULT 0,
  recovered       integer NOT NULL DEFAULT 0,
  discrepancies   integer NOT NULL DEFAULT 0,
  error           text,
  started_at      timestamptz NOT NULL DEFAULT now(),
  finished_at     timestamptz
);
CREATE INDEX reconciliation_runs_provider_idx ON billing.reconciliation_runs (provider, id DESC);

CREATE TABLE billing.discrepancies (
  id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  run_id      bigint REFERENCES billing.reconciliation_runs (id),
  provider    text NOT NULL CHECK (provider IN ('stripe', 'vapi', 'twilio')),
  kind        text NOT NULL CHECK (kind IN ('phantom', 'amount_mismatch', 'duration_mismatch', 'unattributed',
                                          'currency_mismatch', 'unchargeable', 'unsettled_sms')),
  ref         text NOT NULL,
  org_id      uuid,
  evidence    jsonb NOT NULL DEFAULT '{}',
  status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'resolved')),
  resolution  text,
  created_at  timestamptz NOT NULL DEFAULT now(),
  resolved_at timestamptz,
  CONSTRAINT discrepancies_provider_kind_ref_key UNIQUE (provider, kind, ref)
);
CREATE INDEX discrepancies_open_idx ON billing.discrepancies (id) WHERE status = 'open';
