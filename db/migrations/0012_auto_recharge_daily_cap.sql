-- Auto-recharge spend cap (issue 12, item 10): at most so much charged per rolling 24 hours per
-- org. The operator's maximum is a setting; an owner may set a lower cap for its org (null: the
-- operator's maximum). auto_recharge_capped_at marks the first claim the cap refused in this
-- episode, so the customer is notified once, and says since when (health: auto_recharge_capped).

ALTER TABLE billing.settings
  ADD COLUMN max_auto_recharge_daily_minor bigint NOT NULL DEFAULT 500000
    CHECK (max_auto_recharge_daily_minor > 0);

ALTER TABLE billing.wallets
  ADD COLUMN auto_recharge_daily_cap_minor bigint CHECK (auto_recharge_daily_cap_minor > 0),
  ADD COLUMN auto_recharge_capped_at timestamptz;

-- The cap is summed over an org's recent claims on every claim attempt.
CREATE INDEX recharge_claims_org_created_idx ON billing.recharge_claims (org_id, created_at)
  WHERE status IN ('pending', 'succeeded');

ALTER TABLE billing.notifications DROP CONSTRAINT notifications_kind_check;
ALTER TABLE billing.notifications ADD CONSTRAINT notifications_kind_check
  CHECK (kind IN ('low_balance', 'auto_recharge_failed', 'auto_recharge_disabled', 'wallet_suspended',
                  'auto_recharge_capped'));

-- wallet_summary() shows the cap and whether it is holding recharges back.
ALTER TYPE api.wallet_row
  ADD ATTRIBUTE auto_recharge_daily_cap_minor bigint,
  ADD ATTRIBUTE auto_recharge_capped_at timestamptz;

-- configure_auto_recharge gains daily_cap_minor (default: keep the current cap); a 3-argument
-- call still resolves to it, but only once the 3-argument function is gone (otherwise the call
-- is ambiguous). 10_wallets.sql creates the new one right after the migrations.
DROP FUNCTION IF EXISTS api.configure_auto_recharge(boolean, bigint, bigint);
