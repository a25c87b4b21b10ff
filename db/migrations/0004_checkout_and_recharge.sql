-- Outbound Stripe work: Checkout Sessions for top-ups and off-session auto-recharge claims.

CREATE TABLE billing.checkout_requests (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  org_id            uuid NOT NULL REFERENCES billing.wallets (org_id),
  client_request_id uuid NOT NULL,
  amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
  currency          text NOT NULL,
  status            text NOT NULL CHECK (status IN ('creating', 'open', 'completed', 'expired')),
  attempt           integer NOT NULL DEFAULT 1 CHECK (attempt > 0),
  idempotency_key   text NOT NULL UNIQUE,
  session_id        text UNIQUE,
  checkout_url      text,
  session_expires_at timestamptz,
  lease_until       timestamptz,
  requested_by      uuid,
  created_at        timestamptz NOT NULL DEFAULT now(),
  updated_at        timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT checkout_requests_org_client_key UNIQUE (org_id, client_request_id),
  CHECK ((status = 'creating') = (session_id IS NULL))
);
CREATE INDEX checkout_requests_recent_idx ON billing.checkout_requests (org_id, amount_minor, created_at DESC);

-- Another tab's request id answered with an existing session (the dedupe window): remembered,
-- so that the same client_request_id keeps yielding that session after the window closes.
CREATE TABLE billing.checkout_aliases (
  org_id            uuid NOT NULL REFERENCES billing.wallets (org_id),
  client_request_id uuid NOT NULL,
  request_id        bigint NOT NULL REFERENCES billing.checkout_requests (id),
  created_at        timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (org_id, client_request_id)
);

CREATE TABLE billing.recharge_claims (
  id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  org_id            uuid NOT NULL REFERENCES billing.wallets (org_id),
  amount_minor      bigint NOT NULL CHECK (amount_minor > 0),
  currency          text NOT NULL,
  status            text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
  idempotency_key   text NOT NULL UNIQUE,
  payment_intent_id text UNIQUE,
  failure_code      text,
  attempts          integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
  leased_until      timestamptz,
  cooldown_until    timestamptz,
  created_at        timestamptz NOT NULL DEFAULT now(),
  settled_at        timestamptz,
  CHECK ((status = 'pending') = (settled_at IS NULL))
);
-- At most one pending claim per org, whatever races: the second INSERT finds the first.
CREATE UNIQUE INDEX recharge_claims_one_pending_per_org
  ON billing.recharge_claims (org_id) WHERE status = 'pending';
CREATE INDEX recharge_claims_org_idx ON billing.recharge_claims (org_id, id DESC);
