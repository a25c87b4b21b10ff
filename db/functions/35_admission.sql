-- Call admission: before a call runs, hold what the wallet can pay for it and say how many
-- seconds that buys. Vapi ends an admitted call at those seconds (maxDurationSeconds); a call
-- that started without admission is ended by this system (36_call_ends.sql) when its hold runs out.

-- Admit one call on a locked wallet: a hold keyed by the call id, sized to what the wallet
-- affords (billing._affordable_minor) at the org's rate, at most the org's maximum call length,
-- refused below the operator's minimum call. A second admission of the call answers the first.
CREATE OR REPLACE FUNCTION billing._admit_call(
  w billing.wallets, p_call_id text, p_max_minutes integer, p_enforced_by text, p_control_url text)
  RETURNS api.admission
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  s billing.settings := billing._settings();
  h billing.holds;
  e billing.ledger_entries;
  v_cap integer;
  v_seconds integer;
  v_cost bigint;
  r api.op_result;
BEGIN
  SELECT * INTO h FROM billing.holds AS hl WHERE hl.purpose = 'call' AND hl.ref = p_call_id;
  IF FOUND THEN
    IF h.org_id <> w.org_id THEN
      RETURN ROW('conflict', NULL, NULL, w.balance_minor, 'other_org')::api.admission;
    END IF;
    RETURN ROW('duplicate', CASE WHEN h.status <> 'rejected' THEN h.max_duration_seconds END,
               h.amount_minor, w.balance_minor, h.reason)::api.admission;
  END IF;
  -- The end-of-call report can overtake the status update: a charged call needs no hold.
  SELECT * INTO e FROM billing.ledger_entries AS le WHERE le.provider_ref = billing._call_ref(p_call_id);
  IF FOUND THEN
    IF e.org_id <> w.org_id THEN
      RETURN ROW('conflict', NULL, NULL, w.balance_minor, 'other_org')::api.admission;
    END IF;
    RETURN ROW('duplicate', NULL, e.amount_minor, w.balance_minor, 'already_charged')::api.admission;
  END IF;

  -- The longest call the org allows, in whole billing increments when one fits: a call cut
  -- there is billed exactly what its hold holds.
  v_cap := coalesce(p_max_minutes, w.max_call_minutes, s.max_call_minutes) * 60;
  v_cap := coalesce(nullif(v_cap / w.billing_increment_seconds * w.billing_increment_seconds, 0), v_cap);
  IF w.rate_per_minute_minor = 0 THEN
    v_seconds := v_cap;
  ELSE
    -- The most whole increments whose price (billing._call_cost) the wallet can still afford.
    v_seconds := LEAST(v_cap, pg_catalog.floor(
        GREATEST(billing._affordable_minor(w), 0)::numeric * 60 / w.rate_per_minute_minor
        / w.billing_increment_seconds)::bigint * w.billing_increment_seconds)::integer;
  END IF;
  v_cost := billing._call_cost(w, billing._billed_seconds(w, v_seconds));

  r := billing._place_hold(
    w, 'call', p_call_id, v_cost,
    billing._fingerprint(pg_catalog.jsonb_build_object('op', 'admit_call', 'org_id', w.org_id,
                                                       'call_id', p_call_id)),
    now() + pg_catalog.make_interval(secs => v_seconds) + s.hold_grace,
    CASE WHEN v_seconds < s.min_call_seconds THEN 'insufficient_funds' END,
    CASE WHEN v_seconds >= s.min_call_seconds THEN v_seconds END, p_enforced_by, p_control_url);
  RETURN ROW(r.status, CASE WHEN r.status = 'applied' THEN v_seconds END, r.amount_minor,
             r.balance_minor, r.reason)::api.admission;
END
$$;

-- Admit a call that Vapi will end at the admitted seconds: the caller puts
-- max_duration_seconds into the call's maxDurationSeconds (an assistant-request answer or
-- POST /call). Idempotent per call id.
CREATE OR REPLACE FUNCTION api.admit_call(org_id uuid, call_id text, max_minutes integer DEFAULT NULL)
  RETURNS api.admission
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
BEGIN
  IF org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  PERFORM billing._check_key('call_id', call_id);
  -- Vapi's maxDurationSeconds ranges from 10 s to 43,200 s (12 hours).
  IF max_minutes IS NOT NULL AND max_minutes NOT BETWEEN 1 AND 720 THEN
    PERFORM billing._invalid('max_minutes', 'must be between 1 and 720');
  END IF;
  w := billing._lock_wallet(admit_call.org_id);
  IF w.org_id IS NULL THEN
    RETURN ROW('rejected', NULL, NULL, NULL, 'unknown_org')::api.admission;
  END IF;
  RETURN billing._admit_call(w, call_id, max_minutes, 'vapi', NULL);
END
$$;
GRANT EXECUTE ON FUNCTION api.admit_call(uuid, text, integer) TO service_role;

-- An outbound call admitted under a provisional id (before Vapi named the call) is bound to the
-- call id Vapi returned: the hold is re-keyed, so the report finds the admitting org's hold.
CREATE OR REPLACE FUNCTION api.bind_call(org_id uuid, admission_id text, call_id text)
  RETURNS api.admission
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
  h billing.holds;
BEGIN
  IF org_id IS NULL THEN
    PERFORM billing._invalid('org_id', 'must not be null');
  END IF;
  PERFORM billing._check_key('admission_id', admission_id);
  PERFORM billing._check_key('call_id', call_id);
  w := billing._lock_wallet(bind_call.org_id);
  IF w.org_id IS NULL THEN
    RETURN ROW('rejected', NULL, NULL, NULL, 'unknown_org')::api.admission;
  END IF;
  SELECT * INTO h FROM billing.holds AS hl WHERE hl.purpose = 'call' AND hl.ref = bind_call.call_id;
  IF FOUND THEN
    RETURN ROW(CASE WHEN h.org_id = w.org_id THEN 'duplicate' ELSE 'conflict' END,
               h.max_duration_seconds, h.amount_minor, w.balance_minor,
               CASE WHEN h.org_id <> w.org_id THEN 'other_org' END)::api.admission;
  END IF;
  UPDATE billing.holds AS hl SET ref = bind_call.call_id
   WHERE hl.purpose = 'call' AND hl.ref = bind_call.admission_id AND hl.org_id = w.org_id
     AND hl.status = 'open'
  RETURNING * INTO h;
  IF NOT FOUND THEN
    RETURN ROW('rejected', NULL, NULL, w.balance_minor, 'unknown_admission')::api.admission;
  END IF;
  RETURN ROW('applied', h.max_duration_seconds, h.amount_minor, w.balance_minor, NULL)::api.admission;
END
$$;
GRANT EXECUTE ON FUNCTION api.bind_call(uuid, text, text) TO service_role;

-- Inbound calls to this Vapi phone number belong to this org and are answered by this assistant.
CREATE OR REPLACE FUNCTION api.set_inbound_assistant(org_id uuid, phone_number_id text, assistant_id text)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
BEGIN
  PERFORM billing._check_key('phone_number_id', phone_number_id);
  PERFORM billing._check_key('assistant_id', assistant_id);
  IF org_id IS NULL OR NOT EXISTS (SELECT 1 FROM billing.wallets AS w
                                    WHERE w.org_id = set_inbound_assistant.org_id) THEN
    PERFORM billing._invalid('org_id', 'must be an org with a wallet');
  END IF;
  INSERT INTO billing.vapi_routes AS r (kind, vapi_id, org_id, assistant_id)
  VALUES ('phone_number', phone_number_id, set_inbound_assistant.org_id, set_inbound_assistant.assistant_id)
  ON CONFLICT ON CONSTRAINT vapi_routes_pkey
  DO UPDATE SET org_id = EXCLUDED.org_id, assistant_id = EXCLUDED.assistant_id;
END
$$;
GRANT EXECUTE ON FUNCTION api.set_inbound_assistant(uuid, text, text) TO service_role;

-- The org's maximum call length in minutes (null: the operator's default, billing.settings).
CREATE OR REPLACE FUNCTION api.set_max_call_minutes(org_id uuid, max_minutes integer)
  RETURNS api.wallet_row
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  w billing.wallets;
BEGIN
  IF max_minutes IS NOT NULL AND max_minutes NOT BETWEEN 1 AND 720 THEN
    PERFORM billing._invalid('max_minutes', 'must be between 1 and 720, or null');
  END IF;
  UPDATE billing.wallets AS wl SET max_call_minutes = set_max_call_minutes.max_minutes,
                                   version = wl.version + 1, updated_at = now()
   WHERE wl.org_id = set_max_call_minutes.org_id
  RETURNING * INTO w;
  IF NOT FOUND THEN
    PERFORM billing._invalid('org_id', 'no wallet for this org');
  END IF;
  RETURN billing._wallet_row(w);
END
$$;
GRANT EXECUTE ON FUNCTION api.set_max_call_minutes(uuid, integer) TO service_role;
