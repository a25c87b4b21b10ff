-- Wallets: opening, pricing, payment method, and the client's view and settings.

-- The public shape of a wallet row.
CREATE OR REPLACE FUNCTION billing._wallet_row(w billing.wallets)
  RETURNS api.wallet_row
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT ROW(w.org_id, w.currency, w.balance_minor, w.held_minor,
             w.balance_minor - w.held_minor, w.debt_limit_minor, w.status,
             w.rate_per_minute_minor, w.billing_increment_seconds, w.sms_segment_minor,
             w.auto_recharge_enabled, w.auto_recharge_threshold_minor,
             w.auto_recharge_amount_minor, w.auto_recharge_disabled_reason,
             w.low_balance_threshold_minor, w.stripe_payment_method_id IS NOT NULL,
             w.version, w.updated_at, w.auto_recharge_daily_cap_minor,
             w.auto_recharge_capped_at)::api.wallet_row
$$;

-- Open an org's wallet; opening it again returns it unchanged.
CREATE OR REPLACE FUNCTION api.open_wallet(
  org_id uuid, currency text DEFAULT 'usd', debt_limit_minor bigint DEFAULT 0)
  RETURNS api.wallet_row
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
BEGIN
  IF open_wallet.org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  IF open_wallet.currency IS NULL OR open_wallet.currency !~ '^[a-z]{3}$' THEN
    PERFORM billing._invalid('currency', 'must be a lowercase ISO 4217 code');
  END IF;
  IF open_wallet.debt_limit_minor IS NULL OR open_wallet.debt_limit_minor < 0
     OR open_wallet.debt_limit_minor > 1000000000000000 THEN
    PERFORM billing._invalid('debt_limit_minor', 'must be between 0 and 10^15');
  END IF;

  INSERT INTO billing.wallets (org_id, currency, debt_limit_minor)
  VALUES (open_wallet.org_id, open_wallet.currency, open_wallet.debt_limit_minor)
  ON CONFLICT DO NOTHING;

  SELECT * INTO w FROM billing.wallets AS wl WHERE wl.org_id = open_wallet.org_id;
  IF w.currency <> open_wallet.currency THEN
    PERFORM billing._invalid('currency',
      pg_catalog.format('wallet already exists in %s', w.currency));
  END IF;
  RETURN billing._wallet_row(w);
END
$$;
GRANT EXECUTE ON FUNCTION api.open_wallet(uuid, text, bigint) TO service_role;

-- Set an org's prices: per-minute rate, billing increment, per-SMS-segment rate.
CREATE OR REPLACE FUNCTION api.set_pricing(
  org_id uuid, rate_per_minute_minor bigint DEFAULT 70,
  billing_increment_seconds integer DEFAULT 1, sms_segment_minor bigint DEFAULT 1)
  RETURNS api.wallet_row
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
BEGIN
  IF rate_per_minute_minor IS NULL OR rate_per_minute_minor < 0 OR rate_per_minute_minor > 100000000 THEN
    PERFORM billing._invalid('rate_per_minute_minor', 'must be between 0 and 10^8');
  END IF;
  IF billing_increment_seconds IS NULL OR billing_increment_seconds NOT BETWEEN 1 AND 3600 THEN
    PERFORM billing._invalid('billing_increment_seconds', 'must be between 1 and 3600');
  END IF;
  IF sms_segment_minor IS NULL OR sms_segment_minor < 0 OR sms_segment_minor > 100000000 THEN
    PERFORM billing._invalid('sms_segment_minor', 'must be between 0 and 10^8');
  END IF;

  UPDATE billing.wallets AS wl
     SET rate_per_minute_minor = set_pricing.rate_per_minute_minor,
         billing_increment_seconds = set_pricing.billing_increment_seconds,
         sms_segment_minor = set_pricing.sms_segment_minor,
         version = wl.version + 1, updated_at = now()
   WHERE wl.org_id = set_pricing.org_id
  RETURNING * INTO w;
  IF NOT FOUND THEN
    PERFORM billing._invalid('org_id', 'no wallet for this org');
  END IF;
  RETURN billing._wallet_row(w);
END
$$;
GRANT EXECUTE ON FUNCTION api.set_pricing(uuid, bigint, integer, bigint) TO service_role;

-- Record the saved card that auto-recharge charges off-session.
CREATE OR REPLACE FUNCTION api.set_payment_method(
  org_id uuid, stripe_customer_id text, stripe_payment_method_id text)
  RETURNS api.wallet_row
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
BEGIN
  PERFORM billing._check_key('stripe_customer_id', stripe_customer_id);
  PERFORM billing._check_key('stripe_payment_method_id', stripe_payment_method_id);

  -- A new card gets a fresh start: failures of the old one no longer count.
  UPDATE billing.wallets AS wl
     SET stripe_customer_id = set_payment_method.stripe_customer_id,
         stripe_payment_method_id = set_payment_method.stripe_payment_method_id,
         auto_recharge_failures = 0,
         version = wl.version + 1, updated_at = now()
   WHERE wl.org_id = set_payment_method.org_id
  RETURNING * INTO w;
  IF NOT FOUND THEN
    PERFORM billing._invalid('org_id', 'no wallet for this org');
  END IF;
  RETURN billing._wallet_row(w);
END
$$;
GRANT EXECUTE ON FUNCTION api.set_payment_method(uuid, text, text) TO service_role;

-- Set (or clear, with null) the balance below which the org is notified once per crossing.
CREATE OR REPLACE FUNCTION api.set_low_balance_threshold(org_id uuid, threshold_minor bigint)
  RETURNS api.wallet_row
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
BEGIN
  IF threshold_minor IS NOT NULL THEN
    PERFORM billing._check_amount('threshold_minor', threshold_minor);
  END IF;
  UPDATE billing.wallets AS wl
     SET low_balance_threshold_minor = set_low_balance_threshold.threshold_minor,
         -- A new threshold starts a new crossing; re-sending the same one notifies nobody again.
         below_low_balance = CASE WHEN wl.low_balance_threshold_minor
                                       IS NOT DISTINCT FROM set_low_balance_threshold.threshold_minor
                                  THEN wl.below_low_balance ELSE false END,
         version = wl.version + 1, updated_at = now()
   WHERE wl.org_id = set_low_balance_threshold.org_id
  RETURNING * INTO w;
  IF NOT FOUND THEN
    PERFORM billing._invalid('org_id', 'no wallet for this org');
  END IF;
  PERFORM billing._after_balance_change(w.org_id, 0);
  SELECT * INTO w FROM billing.wallets AS wl WHERE wl.org_id = set_low_balance_threshold.org_id;
  RETURN billing._wallet_row(w);
END
$$;
GRANT EXECUTE ON FUNCTION api.set_low_balance_threshold(uuid, bigint) TO service_role;

-- The caller's wallet (RLS scopes the read to the org in the caller's JWT).
CREATE OR REPLACE FUNCTION api.wallet_summary()
  RETURNS api.wallet_row
  LANGUAGE sql STABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT billing._wallet_row(w) FROM billing.wallets AS w
   WHERE w.org_id = billing._caller_org_id()
$$;
GRANT EXECUTE ON FUNCTION api.wallet_summary() TO authenticated;

-- Owners and admins switch auto-recharge on or off, within the operator's bounds, and may cap
-- what it charges per rolling 24 hours (daily_cap_minor, at most the operator's
-- max_auto_recharge_daily_minor; null keeps the current cap, so 3-argument calls are unchanged).
-- SECURITY DEFINER on purpose, the body being the guard (the org from the JWT only, the role
-- checked first): README, "Why two client functions are SECURITY DEFINER".
CREATE OR REPLACE FUNCTION api.configure_auto_recharge(
  enabled boolean, threshold_minor bigint, amount_minor bigint, daily_cap_minor bigint DEFAULT NULL)
  RETURNS api.wallet_row
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_org uuid := billing._require_caller_org();
  s billing.settings := billing._settings();
  w billing.wallets;
BEGIN
  IF coalesce(billing._caller_org_role(), '') NOT IN ('owner', 'admin') THEN
    RAISE EXCEPTION USING ERRCODE = '42501',
      MESSAGE = 'only owners and admins may configure auto-recharge';
  END IF;
  IF enabled IS NULL THEN
    PERFORM billing._invalid('enabled', 'must not be null');
  END IF;
  IF threshold_minor IS NULL OR threshold_minor < 0 OR threshold_minor > s.max_auto_recharge_threshold_minor THEN
    PERFORM billing._invalid('threshold_minor',
      pg_catalog.format('must be between 0 and %s', s.max_auto_recharge_threshold_minor));
  END IF;
  IF amount_minor IS NULL OR amount_minor < s.min_top_up_minor OR amount_minor > s.max_auto_recharge_minor THEN
    PERFORM billing._invalid('amount_minor',
      pg_catalog.format('must be between %s and %s', s.min_top_up_minor, s.max_auto_recharge_minor));
  END IF;
  IF daily_cap_minor IS NOT NULL
     AND daily_cap_minor NOT BETWEEN s.min_top_up_minor AND s.max_auto_recharge_daily_minor THEN
    PERFORM billing._invalid('daily_cap_minor',
      pg_catalog.format('must be between %s and %s', s.min_top_up_minor, s.max_auto_recharge_daily_minor));
  END IF;

  -- Lock the wallet first (the fixed order of every money path), then write.
  PERFORM billing._lock_wallet(v_org);
  UPDATE billing.wallets AS wl
     SET auto_recharge_enabled = configure_auto_recharge.enabled,
         auto_recharge_threshold_minor = configure_auto_recharge.threshold_minor,
         auto_recharge_amount_minor = configure_auto_recharge.amount_minor,
         auto_recharge_failures = CASE WHEN configure_auto_recharge.enabled THEN 0 ELSE wl.auto_recharge_failures END,
         auto_recharge_disabled_reason = NULL,
         auto_recharge_daily_cap_minor = coalesce(configure_auto_recharge.daily_cap_minor,
                                                  wl.auto_recharge_daily_cap_minor),
         -- A new cap is a new episode: reached again, it is notified again.
         auto_recharge_capped_at = CASE WHEN configure_auto_recharge.daily_cap_minor
                                             IS DISTINCT FROM wl.auto_recharge_daily_cap_minor
                                             AND configure_auto_recharge.daily_cap_minor IS NOT NULL
                                        THEN NULL ELSE wl.auto_recharge_capped_at END,
         version = wl.version + 1, updated_at = now()
   WHERE wl.org_id = v_org
  RETURNING * INTO w;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = 'no wallet for the caller''s organisation';
  END IF;
  -- Switched off: a claim not yet sent to Stripe is withdrawn (not a failure: no cooldown).
  IF NOT configure_auto_recharge.enabled THEN
    UPDATE billing.recharge_claims AS rc
       SET status = 'failed', failure_code = 'canceled_by_customer', settled_at = now()
     WHERE rc.org_id = v_org AND rc.status = 'pending' AND rc.payment_intent_id IS NULL
       AND (rc.leased_until IS NULL OR rc.leased_until < now());
  END IF;
  -- A balance already below the new threshold is recharged now, not at the next call.
  PERFORM billing._maybe_claim_recharge(v_org);
  SELECT * INTO w FROM billing.wallets AS wl WHERE wl.org_id = v_org;
  RETURN billing._wallet_row(w);
END
$$;
GRANT EXECUTE ON FUNCTION api.configure_auto_recharge(boolean, bigint, bigint, bigint) TO authenticated;
