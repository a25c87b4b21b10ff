-- Holds: calls and SMS in flight reserve their expected cost; charges capture, releases free it.

-- What an earlier request for this call or message already did, or null if none.
CREATE OR REPLACE FUNCTION billing._existing_hold_outcome(
  p_org_id uuid, p_purpose text, p_ref text, p_fingerprint text)
  RETURNS api.op_result
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  h billing.holds;
BEGIN
  SELECT * INTO h FROM billing.holds WHERE purpose = p_purpose AND ref = p_ref;
  IF NOT FOUND THEN
    RETURN NULL;
  ELSIF h.org_id <> p_org_id THEN
    RETURN billing._result('conflict', p_org_id, 'other_org');
  ELSIF h.fingerprint <> p_fingerprint THEN
    RETURN billing._result('conflict', p_org_id, 'different_request', NULL, h.amount_minor);
  END IF;
  -- A rejected request stays rejected, whatever arrived since.
  RETURN billing._result('duplicate', p_org_id, h.reason, NULL, h.amount_minor);
END
$$;

-- What a locked wallet can still put at risk: its balance, less what is held, down to the debt
-- limit. The one statement of the debt limit for new holds and admissions.
CREATE OR REPLACE FUNCTION billing._affordable_minor(w billing.wallets)
  RETURNS bigint
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN w.balance_minor - w.held_minor + w.debt_limit_minor;
END
$$;

-- Reserve p_amount_minor on a locked wallet unless a suspension, the debt limit or the caller's
-- own refusal (p_refusal) forbids it. A refusal is stored too, so that its retry is answered
-- the same way. A call hold may say how many seconds it pays for and who ends the call there.
CREATE OR REPLACE FUNCTION billing._place_hold(
  w billing.wallets, p_purpose text, p_ref text, p_amount_minor bigint, p_fingerprint text,
  p_expires_at timestamptz, p_refusal text DEFAULT NULL, p_max_duration_seconds integer DEFAULT NULL,
  p_enforced_by text DEFAULT NULL, p_control_url text DEFAULT NULL)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_reason text;
  v_hold_id bigint;
BEGIN
  IF w.status = 'suspended' THEN
    v_reason := 'wallet_suspended';
  ELSIF p_refusal IS NOT NULL THEN
    v_reason := p_refusal;
  ELSIF p_amount_minor > billing._affordable_minor(w) THEN
    v_reason := 'insufficient_funds';
  END IF;

  INSERT INTO billing.holds AS h (org_id, purpose, ref, amount_minor, status, reason, fingerprint,
                                  expires_at, settled_at, max_duration_seconds, enforced_by, control_url)
  VALUES (w.org_id, p_purpose, p_ref, p_amount_minor,
          CASE WHEN v_reason IS NULL THEN 'open' ELSE 'rejected' END, v_reason, p_fingerprint,
          p_expires_at, CASE WHEN v_reason IS NOT NULL THEN now() END, p_max_duration_seconds,
          p_enforced_by, p_control_url)
  ON CONFLICT DO NOTHING
  RETURNING h.id INTO v_hold_id;
  IF v_hold_id IS NULL THEN
    -- The same call id was held concurrently in another org (whose lock we do not hold).
    RETURN billing._existing_hold_outcome(w.org_id, p_purpose, p_ref, p_fingerprint);
  END IF;

  IF v_reason IS NOT NULL THEN
    RETURN ROW('rejected', NULL, p_amount_minor, w.balance_minor, v_reason)::api.op_result;
  END IF;
  UPDATE billing.wallets SET held_minor = held_minor + p_amount_minor, version = version + 1,
                             updated_at = now()
   WHERE org_id = w.org_id;
  RETURN ROW('applied', NULL, p_amount_minor, w.balance_minor, NULL)::api.op_result;
END
$$;

-- Settle an open hold of a locked wallet (captured, released or expired) and free its amount.
-- Returns the amount freed, or null when the hold was no longer open (a 0 hold still frees 0).
CREATE OR REPLACE FUNCTION billing._settle_hold(p_hold_id bigint, p_status text)
  RETURNS bigint
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  h billing.holds;
BEGIN
  UPDATE billing.holds SET status = p_status, settled_at = now()
   WHERE id = p_hold_id AND status = 'open'
  RETURNING * INTO h;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  UPDATE billing.wallets SET held_minor = held_minor - h.amount_minor, version = version + 1,
                             updated_at = now()
   WHERE org_id = h.org_id;
  RETURN h.amount_minor;
END
$$;

-- The pricing rule of calls, for charges and admissions alike: the duration rounded up to the
-- billing increment, then ceil(seconds x rate / 60). Two scalar functions rather than one with
-- OUT parameters: called in an expression they cost no query of their own on the hot path.
CREATE OR REPLACE FUNCTION billing._billed_seconds(w billing.wallets, p_seconds integer)
  RETURNS integer
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN ((p_seconds + w.billing_increment_seconds - 1) / w.billing_increment_seconds)
         * w.billing_increment_seconds;
END
$$;

CREATE OR REPLACE FUNCTION billing._call_cost(w billing.wallets, p_billed_seconds integer)
  RETURNS bigint
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN (p_billed_seconds::bigint * w.rate_per_minute_minor + 59) / 60;
END
$$;

-- The ledger key (and provider reference) of a Vapi call's charge: one per call, across orgs.
CREATE OR REPLACE FUNCTION billing._call_ref(p_call_id text)
  RETURNS text
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN 'vapi:call:' || p_call_id;
END
$$;

-- Authorise a call: hold its expected cost (max_minutes at the org's rate, default from
-- settings) so that concurrent calls together never pass the debt limit.
CREATE OR REPLACE FUNCTION api.authorize_call(org_id uuid, call_id text, max_minutes integer DEFAULT NULL)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_minutes integer := coalesce(max_minutes, (billing._settings()).default_call_max_minutes);
  w billing.wallets;
  e billing.ledger_entries;
  v_fingerprint text;
  r api.op_result;
BEGIN
  IF org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  PERFORM billing._check_key('call_id', call_id);
  IF v_minutes NOT BETWEEN 1 AND 1440 THEN
    PERFORM billing._invalid('max_minutes', 'must be between 1 and 1440');
  END IF;

  w := billing._lock_wallet(authorize_call.org_id);
  IF w.org_id IS NULL THEN
    RETURN ROW('rejected', NULL, NULL, NULL, 'unknown_org')::api.op_result;
  END IF;
  v_fingerprint := billing._fingerprint(pg_catalog.jsonb_build_object(
    'op', 'authorize_call', 'org_id', w.org_id, 'call_id', call_id, 'max_minutes', v_minutes));

  r := billing._existing_hold_outcome(w.org_id, 'call', call_id, v_fingerprint);
  IF r.status IS NOT NULL THEN
    RETURN r;
  END IF;
  -- The end-of-call report can overtake the status update: a charged call needs no hold.
  SELECT * INTO e FROM billing.ledger_entries WHERE provider_ref = billing._call_ref(call_id);
  IF FOUND THEN
    IF e.org_id <> w.org_id THEN
      RETURN billing._result('conflict', w.org_id, 'other_org');
    END IF;
    RETURN billing._result('duplicate', w.org_id, 'already_charged', e.id, e.amount_minor);
  END IF;

  RETURN billing._place_hold(
    w, 'call', call_id, v_minutes * w.rate_per_minute_minor, v_fingerprint,
    now() + pg_catalog.make_interval(mins => v_minutes) + (billing._settings()).hold_grace);
END
$$;
GRANT EXECUTE ON FUNCTION api.authorize_call(uuid, text, integer) TO service_role;

-- The part of a call charge done under the wallet lock: find the call's hold, price the call
-- (billing._billed_seconds, billing._call_cost), post it, free the hold, suspend past the debt limit.
CREATE OR REPLACE FUNCTION billing._charge_call(
  p_org_id uuid, p_call_id text, p_duration_seconds integer, p_details jsonb, p_ref text,
  p_fingerprint text)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  w billing.wallets := billing._lock_wallet(p_org_id);
  h billing.holds;
  v_billed_seconds integer;  -- at most a week rounded up to an hour
  v_cost bigint;
  r api.op_result;
BEGIN
  IF w.org_id IS NULL THEN
    RETURN ROW('rejected', NULL, NULL, NULL, 'unknown_org')::api.op_result;
  END IF;
  SELECT * INTO h FROM billing.holds AS hl WHERE hl.purpose = 'call' AND hl.ref = p_call_id;
  IF FOUND AND h.org_id <> w.org_id THEN
    RETURN billing._result('conflict', w.org_id, 'other_org');
  END IF;

  v_billed_seconds := billing._billed_seconds(w, p_duration_seconds);
  v_cost := billing._call_cost(w, v_billed_seconds);

  r := billing._post_entry(
    w, -v_cost, 'call_charge', p_ref, p_fingerprint, 'vapi', p_ref,
    p_details || pg_catalog.jsonb_build_object(
      'call_id', p_call_id, 'duration_seconds', p_duration_seconds,
      'billed_seconds', v_billed_seconds, 'rate_per_minute_minor', w.rate_per_minute_minor),
    now());
  IF r.status = 'applied' THEN
    IF h.id IS NOT NULL THEN
      PERFORM billing._settle_hold(h.id, 'captured');
    END IF;
    r.reason := billing._after_balance_change(w.org_id, -v_cost);
  END IF;
  RETURN r;
END
$$;

-- Charge a finished call: always recorded, priced here (billing._charge_call). A call charged
-- before is answered from its entry without queueing for the wallet: an entry never changes,
-- so the answer needs no lock (one posted meanwhile is caught by the INSERT's ON CONFLICT), and
-- the hot wallet's lock is held only for the work that needs it.
CREATE OR REPLACE FUNCTION api.deduct_call_credits(
  org_id uuid, call_id text, duration_seconds integer, details jsonb DEFAULT '{}')
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_ref text;
  v_fingerprint text;
  r api.op_result;
BEGIN
  IF org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  PERFORM billing._check_key('call_id', call_id);
  IF duration_seconds IS NULL OR duration_seconds NOT BETWEEN 0 AND 604800 THEN
    PERFORM billing._invalid('duration_seconds', 'must be between 0 and 604800 (one week)');
  END IF;
  IF details IS NULL OR pg_catalog.jsonb_typeof(details) <> 'object' THEN
    PERFORM billing._invalid('details', 'must be a JSON object');
  END IF;

  v_ref := billing._call_ref(call_id);
  v_fingerprint := billing._fingerprint(pg_catalog.jsonb_build_object(
    'op', 'call_charge', 'org_id', deduct_call_credits.org_id, 'call_id', call_id,
    'duration_seconds', duration_seconds));
  r := billing._existing_outcome(deduct_call_credits.org_id, v_ref, v_ref, v_fingerprint);
  IF r.status IS NULL THEN
    r := billing._charge_call(deduct_call_credits.org_id, call_id, duration_seconds, details,
                              v_ref, v_fingerprint);
  END IF;
  IF r.status = 'conflict' AND r.reason = 'different_request' THEN
    -- Kept for reconciliation to resolve: which duration is right is Vapi's to say.
    INSERT INTO billing.discrepancies (provider, kind, ref, org_id, evidence)
    VALUES ('vapi', 'duration_mismatch', call_id, deduct_call_credits.org_id,
            pg_catalog.jsonb_build_object('charged_entry_id', r.entry_id,
                                          'reported_duration_seconds', duration_seconds))
    ON CONFLICT DO NOTHING;
  END IF;
  RETURN r;
END
$$;
GRANT EXECUTE ON FUNCTION api.deduct_call_credits(uuid, text, integer, jsonb) TO service_role;

-- Free the hold of a call that never connected.
CREATE OR REPLACE FUNCTION api.release_call(org_id uuid, call_id text)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
  h billing.holds;
BEGIN
  IF org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  PERFORM billing._check_key('call_id', call_id);

  w := billing._lock_wallet(release_call.org_id);
  IF w.org_id IS NULL THEN
    RETURN ROW('rejected', NULL, NULL, NULL, 'unknown_org')::api.op_result;
  END IF;
  SELECT * INTO h FROM billing.holds AS hl WHERE hl.purpose = 'call' AND hl.ref = call_id;
  IF NOT FOUND THEN
    RETURN billing._result('rejected', w.org_id, 'unknown_call');
  ELSIF h.org_id <> w.org_id THEN
    RETURN billing._result('conflict', w.org_id, 'other_org');
  ELSIF h.status <> 'open' THEN
    RETURN billing._result('duplicate', w.org_id,
      CASE h.status WHEN 'captured' THEN 'already_charged' WHEN 'rejected' THEN h.reason
                    WHEN 'expired' THEN 'hold_expired' END,
      NULL, h.amount_minor);
  END IF;
  PERFORM billing._settle_hold(h.id, 'released');
  RETURN billing._result('applied', w.org_id, NULL, NULL, h.amount_minor);
END
$$;
GRANT EXECUTE ON FUNCTION api.release_call(uuid, text) TO service_role;

-- Hold an outbound SMS's cost until Twilio's status callback settles it.
CREATE OR REPLACE FUNCTION api.register_sms(org_id uuid, message_sid text, segments integer DEFAULT 1)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
  v_fingerprint text;
  r api.op_result;
BEGIN
  IF org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  PERFORM billing._check_key('message_sid', message_sid);
  IF segments IS NULL OR segments NOT BETWEEN 1 AND 100 THEN
    PERFORM billing._invalid('segments', 'must be between 1 and 100');
  END IF;

  w := billing._lock_wallet(register_sms.org_id);
  IF w.org_id IS NULL THEN
    RETURN ROW('rejected', NULL, NULL, NULL, 'unknown_org')::api.op_result;
  END IF;
  v_fingerprint := billing._fingerprint(pg_catalog.jsonb_build_object(
    'op', 'register_sms', 'org_id', w.org_id, 'message_sid', message_sid, 'segments', segments));
  r := billing._existing_hold_outcome(w.org_id, 'sms', message_sid, v_fingerprint);
  IF r.status IS NOT NULL THEN
    RETURN r;
  END IF;
  RETURN billing._place_hold(w, 'sms', message_sid, segments * w.sms_segment_minor, v_fingerprint,
                             now() + (billing._settings()).sms_hold_ttl);
END
$$;
GRANT EXECUTE ON FUNCTION api.register_sms(uuid, text, integer) TO service_role;

-- Every status of twilio-python's MessageInstance.Status: its rank (statuses only move forward;
-- terminal ones share the top) and what it means for the held cost. The one statement of the
-- rule: the callback (billing._settle_sms) and Twilio reconciliation (70_reconciliation.sql)
-- both read it, and tests/test_sms_status_rules.py fails when twilio-python adds a status.
-- Charged follows Twilio's own billing: "Twilio will charge you for a message if delivery was
-- attempted, i.e. the message status is sent, delivered, undelivered, or delivery unknown"; a
-- "failed" message "did not leave Twilio and you will not be charged" (Twilio support, "Will I
-- be charged if Twilio encounters an error when sending an SMS?"). So undelivered and
-- partially_delivered (handed to the carrier) are charged; failed and canceled (never left
-- Twilio) free the hold; received is an inbound message, which Twilio bills as well; accepted,
-- scheduled, queued, sending and receiving are undecided and keep the hold.
CREATE OR REPLACE FUNCTION billing._sms_statuses()
  RETURNS TABLE (status text, rank integer, rule text)
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  VALUES ('accepted', 1, 'in_flight'), ('scheduled', 1, 'in_flight'), ('queued', 1, 'in_flight'),
         ('sending', 1, 'in_flight'), ('receiving', 1, 'in_flight'),
         -- Handed to the carrier: billed, though a delivery receipt may still follow.
         ('sent', 2, 'charged'),
         ('delivered', 3, 'charged'), ('undelivered', 3, 'charged'),
         ('partially_delivered', 3, 'charged'), ('read', 3, 'charged'), ('received', 3, 'charged'),
         ('failed', 3, 'released'), ('canceled', 3, 'released')
$$;

-- The rank of a status (0 for none seen yet, null for a status Twilio does not define).
CREATE OR REPLACE FUNCTION billing._sms_status_rank(p_status text)
  RETURNS integer
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT CASE WHEN p_status IS NULL THEN 0
              ELSE (SELECT s.rank FROM billing._sms_statuses() AS s WHERE s.status = p_status) END
$$;

-- What a status does to the held cost: charged, released or in_flight (null when unknown).
CREATE OR REPLACE FUNCTION billing._sms_status_rule(p_status text)
  RETURNS text
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT s.rule FROM billing._sms_statuses() AS s WHERE s.status = p_status
$$;

-- Apply one SMS status by billing._sms_statuses(): a charged status charges the held cost, a
-- released one frees it; a status at or below the one already seen changes nothing (callbacks
-- arrive out of order), and once charged a message stays charged (Twilio billed the attempt).
CREATE OR REPLACE FUNCTION billing._settle_sms(p_message_sid text, p_status text, p_details jsonb)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  h billing.holds;
  w billing.wallets;
  v_ref text := 'twilio:message:' || p_message_sid;
  v_rule text := billing._sms_status_rule(p_status);
  r api.op_result;
BEGIN
  SELECT * INTO h FROM billing.holds WHERE purpose = 'sms' AND ref = p_message_sid;
  IF NOT FOUND THEN
    -- The platform may not have registered it yet: fail, and let the worker retry.
    RAISE EXCEPTION USING ERRCODE = 'P0002',
      MESSAGE = pg_catalog.format('SMS %s is not registered', p_message_sid);
  END IF;
  IF v_rule IS NULL THEN
    RETURN billing._result('rejected', h.org_id, 'unknown_status');
  END IF;

  w := billing._lock_wallet(h.org_id);
  SELECT * INTO h FROM billing.holds WHERE id = h.id FOR UPDATE;
  IF billing._sms_status_rank(p_status) <= billing._sms_status_rank(h.provider_status) THEN
    RETURN billing._result('duplicate', h.org_id, 'stale_status');
  END IF;
  UPDATE billing.holds SET provider_status = p_status WHERE id = h.id;

  IF v_rule = 'charged' THEN
    r := billing._post_entry(
      w, -h.amount_minor, 'sms_charge', v_ref,
      billing._fingerprint(pg_catalog.jsonb_build_object('op', 'sms_charge', 'message_sid', p_message_sid)),
      'twilio', v_ref, p_details || pg_catalog.jsonb_build_object('message_sid', p_message_sid),
      now());
    IF r.status = 'applied' THEN
      PERFORM billing._settle_hold(h.id, 'captured');
      r.reason := billing._after_balance_change(h.org_id, -h.amount_minor);
    END IF;
    RETURN r;
  ELSIF v_rule = 'released' THEN
    -- Already captured by an earlier sent: the charge stands, nothing is freed twice.
    RETURN billing._result(
      CASE WHEN billing._settle_hold(h.id, 'released') IS NOT NULL THEN 'applied' ELSE 'duplicate' END,
      h.org_id, NULL, NULL, h.amount_minor);
  END IF;
  RETURN billing._result('applied', h.org_id, NULL);
END
$$;

-- Free every hold past its expiry (a call or SMS never reported). Run by the worker. A call's
-- charge is recovered by Vapi reconciliation; an SMS whose status callback never came is
-- recorded as an open unsettled_sms discrepancy (an alert), which Twilio reconciliation settles
-- from Twilio's record (api.reconcile_twilio_message) or an operator by hand.
CREATE OR REPLACE FUNCTION api.expire_holds()
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_org uuid;
  h billing.holds;
  v_count integer := 0;
BEGIN
  -- Wallet first, then its holds: the lock order of every money path.
  FOR v_org IN SELECT DISTINCT ho.org_id FROM billing.holds AS ho
                WHERE ho.status = 'open' AND ho.expires_at < now() ORDER BY 1 LOOP
    PERFORM billing._lock_wallet(v_org);
    FOR h IN SELECT * FROM billing.holds AS ho
              WHERE ho.org_id = v_org AND ho.status = 'open' AND ho.expires_at < now() LOOP
      PERFORM billing._settle_hold(h.id, 'expired');
      IF h.purpose = 'sms' THEN
        INSERT INTO billing.discrepancies (provider, kind, ref, org_id, evidence)
        VALUES ('twilio', 'unsettled_sms', h.ref, h.org_id,
                pg_catalog.jsonb_build_object('held_minor', h.amount_minor, 'registered_at', h.created_at,
                                              'last_status', h.provider_status))
        ON CONFLICT DO NOTHING;
      END IF;
      v_count := v_count + 1;
    END LOOP;
  END LOOP;
  RETURN v_count;
END
$$;
GRANT EXECUTE ON FUNCTION api.expire_holds() TO service_role;
