-- The durable webhook inbox and the routing of Vapi assistants / phone numbers to orgs.

CREATE TABLE billing.webhook_events (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  provider        text NOT NULL CHECK (provider IN ('stripe', 'vapi', 'twilio')),
  event_id        text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 255),
  event_type      text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 255),
  payload         jsonb NOT NULL,
  status          text NOT NULL CHECK (status IN ('processed', 'ignored', 'failed', 'dead', 'unattributed')),
  org_id          uuid,
  result          jsonb,
  attempts        integer NOT NULL DEFAULT 1 CHECK (attempts >= 0),
  last_error      text,
  next_attempt_at timestamptz,
  received_at     timestamptz NOT NULL DEFAULT now(),
  processed_at    timestamptz,
  CONSTRAINT webhook_events_provider_event_key UNIQUE (provider, event_id),
  -- Only a failed event waits for the worker; every other status is terminal.
  CHECK ((status = 'failed') = (next_attempt_at IS NOT NULL))
);
CREATE INDEX webhook_events_retry_idx ON billing.webhook_events (next_attempt_at) WHERE status = 'failed';
CREATE INDEX webhook_events_received_idx ON billing.webhook_events (received_at);
CREATE INDEX webhook_events_attention_idx ON billing.webhook_events (provider, status, received_at)
  WHERE status IN ('failed', 'dead', 'unattributed');

CREATE TABLE billing.vapi_routes (
  kind       text NOT NULL CHECK (kind IN ('assistant', 'phone_number')),
  vapi_id    text NOT NULL CHECK (length(vapi_id) BETWEEN 1 AND 255),
  org_id     uuid NOT NULL REFERENCES billing.wallets (org_id),
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (kind, vapi_id)
);
