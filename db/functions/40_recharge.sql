-- Auto-recharge: claims taken in SQL when a debit crosses the threshold, charged off-session by
-- the worker with the claim's idempotency key, settled by whichever of the worker and the
-- webhook reports first.

-- Take a claim when the org is below its threshold and none is pending or cooling down, within
-- its spend cap per rolling 24 hours. Callers hold the wallet lock; the advisory lock and the
-- partial unique index make the rule hold even for a caller that does not (never a
-- session-level advisory lock). The cap is summed under the same lock, so concurrent debits
-- can never together take more than it.
CREATE OR REPLACE FUNCTION billing._maybe_claim_recharge(p_org_id uuid)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  s billing.settings := billing._settings();
  w billing.wallets;
  v_amount bigint;
  v_cap bigint;
  v_charged bigint;
  v_frees_at timestamptz;
  v_claim_id bigint;
BEGIN
  SELECT * INTO w FROM billing.wallets WHERE org_id = p_org_id;
  IF NOT w.auto_recharge_enabled OR w.stripe_payment_method_id IS NULL
     OR w.balance_minor >= w.auto_recharge_threshold_minor THEN
    RETURN NULL;
  END IF;

  PERFORM pg_catalog.pg_advisory_xact_lock(
    pg_catalog.hashtextextended('creditledger.recharge:' || p_org_id::text, 0));
  IF EXISTS (SELECT 1 FROM billing.recharge_claims
              WHERE org_id = p_org_id
                AND (status = 'pending' OR (status = 'failed' AND cooldown_until > now()))) THEN
    RETURN NULL;
  END IF;

  -- One charge that brings the balance back to threshold + amount, never less than amount,
  -- never more than the operator's cap.
  v_amount := LEAST(
    GREATEST(w.auto_recharge_amount_minor,
             w.auto_recharge_threshold_minor + w.auto_recharge_amount_minor - w.balance_minor),
    s.max_auto_recharge_minor);

  -- The spend cap: what claims that charged or may still charge (pending, succeeded) took in
  -- the last 24 hours. A claim is sized down to what the cap leaves; when that is less than
  -- the smallest top-up, none is taken and the customer is told once per episode (an episode
  -- ends when a claim is taken again, or 24 hours after it began, when the window has moved).
  -- The floor is min_top_up_minor: above Stripe's minimum charge per currency ($0.50 in USD,
  -- https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts), so a sized-down
  -- PaymentIntent is never refused as too small, and no trickle of tiny charges follows.
  v_cap := LEAST(coalesce(w.auto_recharge_daily_cap_minor, s.max_auto_recharge_daily_minor),
                 s.max_auto_recharge_daily_minor);
  SELECT coalesce(sum(c.amount_minor), 0)::bigint, min(c.created_at) + interval '24 hours'
    INTO v_charged, v_frees_at
    FROM billing.recharge_claims AS c
   WHERE c.org_id = p_org_id AND c.status IN ('pending', 'succeeded')
     AND c.created_at > now() - interval '24 hours';
  IF v_cap - v_charged < v_amount THEN
    v_amount := v_cap - v_charged;
  END IF;
  IF v_amount < s.min_top_up_minor THEN
    IF w.auto_recharge_capped_at IS NULL OR w.auto_recharge_capped_at <= now() - interval '24 hours' THEN
      UPDATE billing.wallets SET auto_recharge_capped_at = now() WHERE org_id = p_org_id;
      INSERT INTO billing.notifications (org_id, kind, details)
      VALUES (p_org_id, 'auto_recharge_capped',
              pg_catalog.jsonb_build_object('daily_cap_minor', v_cap, 'charged_24h_minor', v_charged,
                                            'balance_minor', w.balance_minor,
                                            'earliest_next_recharge_at', v_frees_at));
    END IF;
    RETURN NULL;
  END IF;

  INSERT INTO billing.recharge_claims AS c (org_id, amount_minor, currency, status, idempotency_key)
  VALUES (p_org_id, v_amount, w.currency, 'pending',
          'creditledger-recharge-' || pg_catalog.gen_random_uuid()::text)
  ON CONFLICT DO NOTHING
  RETURNING c.id INTO v_claim_id;
  IF v_claim_id IS NOT NULL AND w.auto_recharge_capped_at IS NOT NULL THEN
    UPDATE billing.wallets SET auto_recharge_capped_at = NULL WHERE org_id = p_org_id;
  END IF;
  RETURN v_claim_id;
END
$$;

-- Hand due claims to the worker: each leased for a short while so that a crashed worker's
-- claim is picked up again, with the same idempotency key (Stripe then replays, never recharges).
-- attempts counts this lease; created_at bounds the worker's search for a PaymentIntent that an
-- earlier attempt created but never recorded (shim/recharge.py earlier_intent), and
-- sent_to_customers says under which customers to search: every one the claim was leased for,
-- this lease's included (the wallet's customer may change between attempts).
CREATE OR REPLACE FUNCTION api.lease_recharge_claims(max_claims integer DEFAULT 10)
  RETURNS TABLE (
    claim_id bigint, org_id uuid, amount_minor bigint, currency text, idempotency_key text,
    stripe_customer_id text, stripe_payment_method_id text, attempts integer,
    created_at timestamptz, sent_to_customers text[])
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
BEGIN
  IF max_claims IS NULL OR max_claims NOT BETWEEN 1 AND 1000 THEN
    PERFORM billing._invalid('max_claims', 'must be between 1 and 1000');
  END IF;
  -- Auto-recharge switched off since the claim was taken (its attempt deferred): withdrawn.
  UPDATE billing.recharge_claims AS rc
     SET status = 'failed', failure_code = 'canceled_by_customer', settled_at = now(), leased_until = NULL
    FROM billing.wallets AS w
   WHERE w.org_id = rc.org_id AND NOT w.auto_recharge_enabled
     AND rc.status = 'pending' AND rc.payment_intent_id IS NULL
     AND (rc.leased_until IS NULL OR rc.leased_until < now());
  RETURN QUERY
    WITH due AS (
      SELECT c.id FROM billing.recharge_claims AS c
       WHERE c.status = 'pending' AND (c.leased_until IS NULL OR c.leased_until < now())
         -- A PaymentIntent still processing (a bank debit takes days) is settled by its webhook
         -- or by reconciliation, never created again: Stripe forgets idempotency keys after 24 h.
         AND c.payment_intent_id IS NULL
       ORDER BY c.id
       LIMIT max_claims
       FOR UPDATE SKIP LOCKED)
    UPDATE billing.recharge_claims AS c
       SET leased_until = now() + (billing._settings()).recharge_lease, attempts = c.attempts + 1,
           sent_to_customers = CASE
             WHEN w.stripe_customer_id IS NULL OR w.stripe_customer_id = ANY (c.sent_to_customers)
               THEN c.sent_to_customers
             ELSE c.sent_to_customers || w.stripe_customer_id END
      FROM due, billing.wallets AS w
     WHERE c.id = due.id AND w.org_id = c.org_id
    RETURNING c.id, c.org_id, c.amount_minor, c.currency, c.idempotency_key,
              w.stripe_customer_id, w.stripe_payment_method_id, c.attempts, c.created_at,
              c.sent_to_customers;
END
$$;
GRANT EXECUTE ON FUNCTION api.lease_recharge_claims(integer) TO service_role;

-- A recharge PaymentIntent succeeded: credit it (keyed on the PaymentIntent, like every Stripe
-- payment) and close the claim. The wallet is locked by the credit before the claim is touched.
CREATE OR REPLACE FUNCTION billing._recharge_succeeded(
  p_claim_id bigint, p_payment_intent_id text, p_amount_minor bigint, p_currency text,
  p_details jsonb, p_occurred_at timestamptz)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  c billing.recharge_claims;
  r api.op_result;
BEGIN
  SELECT * INTO c FROM billing.recharge_claims WHERE id = p_claim_id;
  IF NOT FOUND THEN
    PERFORM billing._invalid('claim_id', pg_catalog.format('no claim %s', p_claim_id));
  END IF;
  r := billing._credit_stripe_payment(c.org_id, p_payment_intent_id, p_amount_minor, p_currency,
                                      'auto_recharge', p_details, p_occurred_at);
  IF r.status IN ('applied', 'duplicate') THEN
    UPDATE billing.recharge_claims
       SET status = 'succeeded', payment_intent_id = p_payment_intent_id, settled_at = now(),
           leased_until = NULL, failure_code = NULL
     WHERE id = p_claim_id AND status <> 'succeeded';
    UPDATE billing.wallets SET auto_recharge_failures = 0 WHERE org_id = c.org_id;
  END IF;
  RETURN r;
END
$$;

-- A recharge was declined: the claim fails and cools down (no retry storm); after the
-- operator's number of consecutive failures, auto-recharge is switched off and the org told.
CREATE OR REPLACE FUNCTION billing._recharge_failed(
  p_claim_id bigint, p_failure_code text, p_payment_intent_id text)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  c billing.recharge_claims;
  w billing.wallets;
  s billing.settings := billing._settings();
BEGIN
  SELECT * INTO c FROM billing.recharge_claims WHERE id = p_claim_id;
  IF NOT FOUND THEN
    PERFORM billing._invalid('claim_id', pg_catalog.format('no claim %s', p_claim_id));
  END IF;
  w := billing._lock_wallet(c.org_id);
  UPDATE billing.recharge_claims
     SET status = 'failed', failure_code = coalesce(p_failure_code, 'unknown'),
         payment_intent_id = coalesce(p_payment_intent_id, payment_intent_id),
         cooldown_until = now() + s.recharge_cooldown, settled_at = now(), leased_until = NULL
   WHERE id = p_claim_id AND status = 'pending';
  IF NOT FOUND THEN
    RETURN billing._result('duplicate', c.org_id, c.failure_code);
  END IF;

  UPDATE billing.wallets SET auto_recharge_failures = auto_recharge_failures + 1
   WHERE org_id = c.org_id
  RETURNING * INTO w;
  INSERT INTO billing.notifications (org_id, kind, details)
  VALUES (c.org_id, 'auto_recharge_failed',
          pg_catalog.jsonb_build_object('claim_id', p_claim_id, 'failure_code', p_failure_code,
                                        'consecutive_failures', w.auto_recharge_failures));
  IF w.auto_recharge_failures >= s.recharge_max_failures AND w.auto_recharge_enabled THEN
    UPDATE billing.wallets
       SET auto_recharge_enabled = false,
           auto_recharge_disabled_reason = pg_catalog.format(
             '%s consecutive failures, last: %s', w.auto_recharge_failures, p_failure_code),
           version = version + 1, updated_at = now()
     WHERE org_id = c.org_id;
    INSERT INTO billing.notifications (org_id, kind, details)
    VALUES (c.org_id, 'auto_recharge_disabled',
            pg_catalog.jsonb_build_object('consecutive_failures', w.auto_recharge_failures,
                                          'failure_code', p_failure_code));
  END IF;
  RETURN billing._result('rejected', c.org_id, coalesce(p_failure_code, 'unknown'));
END
$$;

-- Stripe accepted a claim's PaymentIntent but it is still processing: remember it, so the claim
-- is never charged again; payment_intent.succeeded / payment_failed (or reconciliation) settle it.
CREATE OR REPLACE FUNCTION api.mark_recharge_processing(claim_id bigint, payment_intent_id text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  c billing.recharge_claims;
BEGIN
  PERFORM billing._check_key('payment_intent_id', payment_intent_id);
  UPDATE billing.recharge_claims AS rc
     SET payment_intent_id = mark_recharge_processing.payment_intent_id, leased_until = NULL
   WHERE rc.id = mark_recharge_processing.claim_id AND rc.status = 'pending'
  RETURNING * INTO c;
  IF NOT FOUND THEN
    -- Settled meanwhile (its webhook overtook the worker): say how, change nothing.
    SELECT * INTO c FROM billing.recharge_claims AS rc WHERE rc.id = mark_recharge_processing.claim_id;
    IF NOT FOUND THEN
      PERFORM billing._invalid('claim_id', 'no claim with this id');
    END IF;
  END IF;
  RETURN pg_catalog.jsonb_build_object('claim_id', c.id, 'status', c.status,
                                       'payment_intent_id', c.payment_intent_id);
END
$$;
GRANT EXECUTE ON FUNCTION api.mark_recharge_processing(bigint, text) TO service_role;

-- The worker reports what Stripe answered for a claim's PaymentIntent.
CREATE OR REPLACE FUNCTION api.record_recharge_result(
  claim_id bigint, outcome text, payment_intent_id text DEFAULT NULL,
  amount_minor bigint DEFAULT NULL, currency text DEFAULT NULL, failure_code text DEFAULT NULL)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
BEGIN
  IF claim_id IS NULL THEN
    PERFORM billing._invalid('claim_id', 'must not be null');
  END IF;
  IF outcome = 'succeeded' THEN
    PERFORM billing._check_key('payment_intent_id', payment_intent_id);
    PERFORM billing._check_amount('amount_minor', amount_minor);
    RETURN billing._recharge_succeeded(claim_id, payment_intent_id, amount_minor, currency,
                                       pg_catalog.jsonb_build_object('recorded_by', 'worker'), now());
  ELSIF outcome = 'failed' THEN
    RETURN billing._recharge_failed(claim_id, failure_code, payment_intent_id);
  END IF;
  PERFORM billing._invalid('outcome', 'must be succeeded or failed');
  RETURN NULL;
END
$$;
GRANT EXECUTE ON FUNCTION api.record_recharge_result(bigint, text, text, bigint, text, text) TO service_role;
