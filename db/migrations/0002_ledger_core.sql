-- The ledger core: wallets, the append-only ledger, holds, operator settings and the result type.
-- Money is bigint minor units everywhere. Constraints repeat the functions' checks (pgledger's
-- habit) so that a bug in a function cannot write a row the model forbids.

CREATE SCHEMA IF NOT EXISTS billing;
CREATE SCHEMA IF NOT EXISTS api;

-- Deny by default: nothing new is executable by PUBLIC; each function is granted next to it.
ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA api REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA billing REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
REVOKE ALL ON SCHEMA billing FROM PUBLIC;
REVOKE ALL ON SCHEMA api FROM PUBLIC;

-- The answer of every money-moving function (README, "The money functions").
CREATE TYPE api.op_result AS (
  status        text,
  entry_id      bigint,
  amount_minor  bigint,
  balance_minor bigint,
  reason        text
);

-- What wallet functions return (README, "The money functions": at least org_id, currency, balance_minor, held_minor,
-- available_minor, debt_limit_minor, status), plus pricing and auto-recharge settings.
CREATE TYPE api.wallet_row AS (
  org_id                        uuid,
  currency                      text,
  balance_minor                 bigint,
  held_minor                    bigint,
  available_minor               bigint,
  debt_limit_minor              bigint,
  status                        text,
  rate_per_minute_minor         bigint,
  billing_increment_seconds     integer,
  sms_segment_minor             bigint,
  auto_recharge_enabled         boolean,
  auto_recharge_threshold_minor bigint,
  auto_recharge_amount_minor    bigint,
  auto_recharge_disabled_reason text,
  low_balance_threshold_minor   bigint,
  has_payment_method            boolean,
  version                       bigint,
  updated_at                    timestamptz
);

-- Operator-set bounds and timings: one row, edited with UPDATE by a DBA.
CREATE TABLE billing.settings (
  singleton                       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
  min_top_up_minor                bigint NOT NULL DEFAULT 500 CHECK (min_top_up_minor > 0),
  max_top_up_minor                bigint NOT NULL DEFAULT 500000 CHECK (max_top_up_minor >= min_top_up_minor),
  max_auto_recharge_minor         bigint NOT NULL DEFAULT 200000 CHECK (max_auto_recharge_minor > 0),
  max_auto_recharge_threshold_minor bigint NOT NULL DEFAULT 1000000 CHECK (max_auto_recharge_threshold_minor >= 0),
  recharge_cooldown               interval NOT NULL DEFAULT interval '1 hour',
  recharge_max_failures           integer NOT NULL DEFAULT 3 CHECK (recharge_max_failures > 0),
  recharge_lease                  interval NOT NULL DEFAULT interval '2 minutes',
  default_call_max_minutes        integer NOT NULL DEFAULT 5 CHECK (default_call_max_minutes > 0),
  hold_grace                      interval NOT NULL DEFAULT interval '10 minutes',
  sms_hold_ttl                    interval NOT NULL DEFAULT interval '24 hours',
  webhook_max_attempts            integer NOT NULL DEFAULT 8 CHECK (webhook_max_attempts > 0),
  webhook_retry_base              interval NOT NULL DEFAULT interval '30 seconds',
  checkout_lease                  interval NOT NULL DEFAULT interval '30 seconds',
  checkout_dedupe_window          interval NOT NULL DEFAULT interval '60 seconds',
  reconcile_every                 interval NOT NULL DEFAULT interval '6 hours',
  reconcile_stripe_lookback       interval NOT NULL DEFAULT interval '3 days',
  reconcile_vapi_lookback         interval NOT NULL DEFAULT interval '24 hours'
);
INSERT INTO billing.settings DEFAULT VALUES;

CREATE TABLE billing.wallets (
  org_id                        uuid PRIMARY KEY,
  currency                      text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
  balance_minor                 bigint NOT NULL DEFAULT 0,
  held_minor                    bigint NOT NULL DEFAULT 0 CHECK (held_minor >= 0),
  debt_limit_minor              bigint NOT NULL DEFAULT 0 CHECK (debt_limit_minor >= 0),
  status                        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
  rate_per_minute_minor         bigint NOT NULL DEFAULT 70 CHECK (rate_per_minute_minor >= 0),
  billing_increment_seconds     integer NOT NULL DEFAULT 1 CHECK (billing_increment_seconds BETWEEN 1 AND 3600),
  sms_segment_minor             bigint NOT NULL DEFAULT 1 CHECK (sms_segment_minor >= 0),
  auto_recharge_enabled         boolean NOT NULL DEFAULT false,
  auto_recharge_threshold_minor bigint NOT NULL DEFAULT 0 CHECK (auto_recharge_threshold_minor >= 0),
  auto_recharge_amount_minor    bigint NOT NULL DEFAULT 0 CHECK (auto_recharge_amount_minor >= 0),
  auto_recharge_failures        integer NOT NULL DEFAULT 0 CHECK (auto_recharge_failures >= 0),
  auto_recharge_disabled_reason text,
  low_balance_threshold_minor   bigint CHECK (low_balance_threshold_minor >= 0),
  below_low_balance             boolean NOT NULL DEFAULT false,
  stripe_customer_id            text,
  stripe_payment_method_id      text,
  version                       bigint NOT NULL DEFAULT 0,
  created_at                    timestamptz NOT NULL DEFAULT now(),
  updated_at                    timestamptz NOT NULL DEFAULT now(),
  CHECK (NOT auto_recharge_enabled OR auto_recharge_amount_minor > 0)
);

-- Append-only: each row is one movement of money, with the balance it left behind.
CREATE TABLE billing.ledger_entries (
  id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  org_id              uuid NOT NULL REFERENCES billing.wallets (org_id),
  amount_minor        bigint NOT NULL,
  balance_after_minor bigint NOT NULL,
  currency            text NOT NULL,
  kind                text NOT NULL CHECK (kind IN (
                        'top_up', 'auto_recharge', 'promo', 'adjustment', 'refund_reversal',
                        'dispute_reversal', 'call_charge', 'sms_charge', 'refund', 'dispute')),
  idempotency_key     text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 320),
  fingerprint         text NOT NULL,
  reason              text,
  source              text NOT NULL CHECK (source IN ('manual', 'stripe', 'vapi', 'twilio', 'system')),
  provider_ref        text CHECK (length(provider_ref) <= 320),
  details             jsonb NOT NULL DEFAULT '{}',
  occurred_at         timestamptz NOT NULL DEFAULT now(),
  created_at          timestamptz NOT NULL DEFAULT now(),
  CONSTRAINT ledger_entries_org_key UNIQUE (org_id, idempotency_key),
  -- Credits are positive and debits negative; a 0 s call is recorded at 0 so it stays idempotent.
  CONSTRAINT ledger_entries_sign CHECK (
    (kind IN ('top_up', 'auto_recharge', 'promo', 'refund_reversal', 'dispute_reversal') AND amount_minor > 0)
    OR (kind IN ('refund', 'dispute') AND amount_minor < 0)
    OR (kind IN ('call_charge', 'sms_charge') AND amount_minor <= 0)
    OR (kind = 'adjustment' AND amount_minor <> 0))
);
-- A provider object (PaymentIntent, refund, dispute step, Vapi call, Twilio message) moves money
-- once, in one org only.
CREATE UNIQUE INDEX ledger_entries_provider_ref_key
  ON billing.ledger_entries (provider_ref) WHERE provider_ref IS NOT NULL;
CREATE INDEX ledger_entries_org_id_idx ON billing.ledger_entries (org_id, id DESC);

-- Open reservations for calls and SMS in flight; also remembers rejected authorisations so that
-- a retry with the same call id stays rejected.
CREATE TABLE billing.holds (
  id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  org_id          uuid NOT NULL REFERENCES billing.wallets (org_id),
  purpose         text NOT NULL CHECK (purpose IN ('call', 'sms')),
  ref             text NOT NULL CHECK (length(ref) BETWEEN 1 AND 255),
  amount_minor    bigint NOT NULL CHECK (amount_minor >= 0),
  status          text NOT NULL CHECK (status IN ('open', 'captured', 'released', 'expired', 'rejected')),
  reason          text,
  fingerprint     text NOT NULL,
  provider_status text,
  expires_at      timestamptz NOT NULL,
  created_at      timestamptz NOT NULL DEFAULT now(),
  settled_at      timestamptz,
  CONSTRAINT holds_purpose_ref_key UNIQUE (purpose, ref),
  CHECK ((status = 'open') = (settled_at IS NULL))
);
CREATE INDEX holds_open_expiry_idx ON billing.holds (expires_at) WHERE status = 'open';
CREATE INDEX holds_open_org_idx ON billing.holds (org_id) WHERE status = 'open';

-- Messages for the platform to deliver (low balance, auto-recharge disabled): one per crossing.
CREATE TABLE billing.notifications (
  id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  org_id       uuid NOT NULL REFERENCES billing.wallets (org_id),
  kind         text NOT NULL CHECK (kind IN ('low_balance', 'auto_recharge_failed', 'auto_recharge_disabled', 'wallet_suspended')),
  details      jsonb NOT NULL DEFAULT '{}',
  created_at   timestamptz NOT NULL DEFAULT now(),
  delivered_at timestamptz
);
CREATE INDEX notifications_undelivered_idx ON billing.notifications (id) WHERE delivered_at IS NULL;

-- The ledger is append-only: corrections are new entries, never edits (pgledger).
CREATE FUNCTION billing._refuse_ledger_change() RETURNS trigger
  LANGUAGE plpgsql SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RAISE EXCEPTION USING
    ERRCODE = '55000',
    MESSAGE = 'billing.ledger_entries is append-only',
    DETAIL = pg_catalog.format('%s refused on ledger entry', TG_OP),
    HINT = 'Record a correcting entry (kind adjustment) instead.';
END
$$;

CREATE TRIGGER ledger_entries_append_only
  BEFORE UPDATE OR DELETE ON billing.ledger_entries
  FOR EACH ROW EXECUTE FUNCTION billing._refuse_ledger_change();
CREATE TRIGGER ledger_entries_no_truncate
  BEFORE TRUNCATE ON billing.ledger_entries
  FOR EACH STATEMENT EXECUTE FUNCTION billing._refuse_ledger_change();
