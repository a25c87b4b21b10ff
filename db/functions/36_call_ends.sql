-- Calls this system must end itself, through the call's Live Call Control URL
-- (`call.monitor.controlUrl`, POST {"type": "end-call"}): a call refused when it started, and a
-- call whose hold is about to run out that Vapi will not cut (it started without admission).
-- One request per call, so it is ended once; the shim or the worker sends it and records the
-- answer here (api.record_call_end).

-- Ask for a call to be ended (no-op when it was asked before).
CREATE OR REPLACE FUNCTION billing._request_call_end(
  p_org_id uuid, p_call_id text, p_reason text, p_control_url text)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  INSERT INTO billing.call_end_requests (call_id, org_id, reason, control_url, next_attempt_at)
  VALUES (p_call_id, p_org_id, p_reason, p_control_url, now())
  ON CONFLICT (call_id) DO NOTHING;
END
$$;

-- A request that cannot be carried out: kept as failed, and an open discrepancy (an alert).
CREATE OR REPLACE FUNCTION billing._call_end_failed(c billing.call_end_requests, p_error text)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  UPDATE billing.call_end_requests
     SET status = 'failed', last_error = p_error, next_attempt_at = NULL
   WHERE call_id = c.call_id;
  INSERT INTO billing.discrepancies (provider, kind, ref, org_id, evidence)
  VALUES ('vapi', 'call_not_ended', c.call_id, c.org_id,
          pg_catalog.jsonb_build_object('reason', c.reason, 'attempts', c.attempts, 'error', p_error))
  ON CONFLICT DO NOTHING;
END
$$;

-- The calls to end now, each leased to one sender until its next attempt is due. Open holds
-- this system enforces are asked to end call_end_lead before they run out (the worker passes
-- more often than that), so the charge stays within the hold. A call reported meanwhile needs
-- no ending; one without a control URL cannot be ended and is failed at once.
CREATE OR REPLACE FUNCTION api.lease_call_ends(max_calls integer DEFAULT 20, only_call_id text DEFAULT NULL)
  RETURNS TABLE (call_id text, control_url text, reason text, attempts integer)
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  s billing.settings := billing._settings();
  c billing.call_end_requests;
BEGIN
  IF max_calls IS NULL OR max_calls NOT BETWEEN 1 AND 1000 THEN
    PERFORM billing._invalid('max_calls', 'must be between 1 and 1000');
  END IF;
  INSERT INTO billing.call_end_requests AS ce (call_id, org_id, reason, control_url, next_attempt_at)
  SELECT h.ref, h.org_id, 'hold_exhausted', h.control_url, now()
    FROM billing.holds AS h
   WHERE h.status = 'open' AND h.enforced_by = 'control_url'
     AND h.created_at + pg_catalog.make_interval(secs => h.max_duration_seconds) - s.call_end_lead <= now()
  ON CONFLICT ON CONSTRAINT call_end_requests_pkey DO NOTHING;

  UPDATE billing.call_end_requests AS ce
     SET status = 'ended', ended_at = now(), next_attempt_at = NULL,
         last_error = 'reported before it was ended'
   WHERE ce.status = 'pending'
     AND EXISTS (SELECT 1 FROM billing.ledger_entries AS le WHERE le.provider_ref = billing._call_ref(ce.call_id));
  FOR c IN SELECT * FROM billing.call_end_requests AS ce
            WHERE ce.status = 'pending' AND ce.control_url IS NULL FOR UPDATE SKIP LOCKED LOOP
    PERFORM billing._call_end_failed(c, 'the call has no monitor.controlUrl');
  END LOOP;

  RETURN QUERY
  UPDATE billing.call_end_requests AS ce
     SET attempts = ce.attempts + 1,
         next_attempt_at = now() + s.call_end_retry * power(2, LEAST(ce.attempts, 6))
   WHERE ce.call_id IN (
           SELECT d.call_id FROM billing.call_end_requests AS d
            WHERE d.status = 'pending' AND d.next_attempt_at <= now()
              AND (only_call_id IS NULL OR d.call_id = only_call_id)
            ORDER BY d.next_attempt_at
            LIMIT max_calls
              FOR UPDATE SKIP LOCKED)
  RETURNING ce.call_id, ce.control_url, ce.reason, ce.attempts;
END
$$;
GRANT EXECUTE ON FUNCTION api.lease_call_ends(integer, text) TO service_role;

-- What the control URL answered to one end-call attempt. After five failed attempts
-- the request is failed and alerted: an operator ends the call by hand (runbook).
CREATE OR REPLACE FUNCTION api.record_call_end(call_id text, ended boolean, error text DEFAULT NULL)
  RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  c billing.call_end_requests;
BEGIN
  PERFORM billing._check_key('call_id', call_id);
  IF ended IS NULL THEN
    PERFORM billing._invalid('ended', 'must not be null');
  END IF;
  SELECT * INTO c FROM billing.call_end_requests AS ce WHERE ce.call_id = record_call_end.call_id FOR UPDATE;
  IF NOT FOUND THEN
    PERFORM billing._invalid('call_id', 'no end was requested for this call');
  END IF;
  IF c.status <> 'pending' THEN
    RETURN c.status;
  ELSIF ended THEN
    UPDATE billing.call_end_requests AS ce
       SET status = 'ended', ended_at = now(), next_attempt_at = NULL, last_error = record_call_end.error
     WHERE ce.call_id = c.call_id;
    RETURN 'ended';
  ELSIF c.attempts >= 5 THEN
    PERFORM billing._call_end_failed(c, error);
    RETURN 'failed';
  END IF;
  UPDATE billing.call_end_requests AS ce SET last_error = record_call_end.error
   WHERE ce.call_id = c.call_id;
  RETURN 'pending';
END
$$;
GRANT EXECUTE ON FUNCTION api.record_call_end(text, boolean, text) TO service_role;
