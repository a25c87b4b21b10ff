-- Reconciliation: Stripe's, Vapi's and Twilio's own records fed through the webhook path, so that
-- what a lost webhook missed is applied exactly once, and what does not add up is recorded.

-- Start a run, or resume the provider's interrupted one (its cursor says how far it got).
CREATE OR REPLACE FUNCTION api.start_reconciliation_run(
  provider text, window_start timestamptz, window_end timestamptz)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  run billing.reconciliation_runs;
BEGIN
  IF provider IS NULL OR provider NOT IN ('stripe', 'vapi', 'twilio') THEN
    PERFORM billing._invalid('provider', 'must be stripe, vapi or twilio');
  END IF;
  IF window_start IS NULL OR window_end IS NULL OR window_end <= window_start THEN
    PERFORM billing._invalid('window_end', 'must be after window_start');
  END IF;

  -- A run of this provider that has made no progress for reconcile_stall was killed without
  -- finishing (its process is gone, a live one counts every object): failed, so it resumes.
  UPDATE billing.reconciliation_runs AS r
     SET status = 'failed', finished_at = now(),
         error = pg_catalog.format('abandoned: no progress since %s', r.progressed_at)
    FROM billing.settings AS s
   WHERE r.provider = start_reconciliation_run.provider AND r.status = 'running'
     AND r.progressed_at < now() - s.reconcile_stall;

  -- An interrupted run over the same window continues where it stopped.
  UPDATE billing.reconciliation_runs AS r
     SET status = 'running', error = NULL, finished_at = NULL, progressed_at = now()
   WHERE r.id = (SELECT x.id FROM billing.reconciliation_runs AS x
                  WHERE x.provider = start_reconciliation_run.provider
                    AND x.window_start = start_reconciliation_run.window_start
                    AND x.window_end = start_reconciliation_run.window_end
                    AND x.status = 'failed'
                  ORDER BY x.id DESC LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING * INTO run;
  IF NOT FOUND THEN
    INSERT INTO billing.reconciliation_runs AS r (provider, window_start, window_end)
    VALUES (start_reconciliation_run.provider, start_reconciliation_run.window_start,
            start_reconciliation_run.window_end)
    RETURNING * INTO run;
  END IF;
  RETURN pg_catalog.jsonb_build_object('run_id', run.id, 'resume_cursor', run.resume_cursor,
                                       'resumed', run.resume_cursor IS NOT NULL);
END
$$;
GRANT EXECUTE ON FUNCTION api.start_reconciliation_run(text, timestamptz, timestamptz) TO service_role;

-- Count what one object did in a run; remember how far the run got.
CREATE OR REPLACE FUNCTION billing._count_in_run(p_run_id bigint, p_outcome text, p_cursor timestamptz)
  RETURNS void
  LANGUAGE sql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
  UPDATE billing.reconciliation_runs
     SET seen = seen + 1,
         already_applied = already_applied + (p_outcome = 'already_applied')::integer,
         recovered = recovered + (p_outcome = 'recovered')::integer,
         unreadable = unreadable + (p_outcome = 'unreadable')::integer,
         resume_cursor = coalesce(p_cursor, resume_cursor), progressed_at = now()
   WHERE id = p_run_id
$$;

-- Record something that does not add up, once per provider object and kind.
CREATE OR REPLACE FUNCTION billing._record_discrepancy(
  p_run_id bigint, p_provider text, p_kind text, p_ref text, p_org_id uuid, p_evidence jsonb)
  RETURNS void
  LANGUAGE sql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
  INSERT INTO billing.discrepancies (run_id, provider, kind, ref, org_id, evidence)
  VALUES (p_run_id, p_provider, p_kind, p_ref, p_org_id, p_evidence)
  ON CONFLICT ON CONSTRAINT discrepancies_provider_kind_ref_key DO NOTHING
$$;

-- One provider object a run could not read or apply (PostgreSQL refuses its JSON, or applying it
-- raised): a discrepancy naming the object and the error, counted in the run, which goes on to
-- the next object. Seen again by a later run, it is counted again under the same discrepancy.
CREATE OR REPLACE FUNCTION billing._record_unreadable(
  p_run_id bigint, p_provider text, p_ref text, p_error text, p_object text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  PERFORM billing._record_discrepancy(
    p_run_id, p_provider, 'unreadable', p_ref, NULL,
    -- The object's text is kept for the operator (cut at 8 KB: a poison object may be huge).
    pg_catalog.jsonb_build_object('error', p_error, 'object', pg_catalog.left(p_object, 8192)));
  PERFORM billing._count_in_run(p_run_id, 'unreadable', NULL);
  RETURN pg_catalog.jsonb_build_object('outcome', 'unreadable', 'error', p_error);
END
$$;

-- How an inbox answer reads in a reconciliation: applied now (recovered), applied before by
-- this event or another path (already_applied), or neither.
CREATE OR REPLACE FUNCTION billing._reconcile_outcome(p_answer jsonb)
  RETURNS text
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT CASE
    -- Already in the inbox but not applied (waiting for the worker, or dead): not 'applied'.
    WHEN p_answer ->> 'status' = 'duplicate' AND p_answer ->> 'event_status' IN ('failed', 'dead')
      THEN 'in_inbox_' || (p_answer ->> 'event_status')
    WHEN p_answer ->> 'status' = 'duplicate' THEN 'already_applied'
    WHEN p_answer -> 'result' ->> 'status' = 'applied' THEN 'recovered'
    WHEN p_answer -> 'result' ->> 'status' = 'duplicate' THEN 'already_applied'
    WHEN p_answer -> 'result' ->> 'status' = 'conflict' THEN 'mismatch'
    ELSE coalesce(p_answer ->> 'status', 'unknown')
  END
$$;

-- One Stripe event from GET /v1/events, through exactly the webhook's path.
CREATE OR REPLACE FUNCTION api.reconcile_stripe_event(run_id bigint, event jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_answer jsonb;
  v_outcome text;
  o jsonb := event -> 'data' -> 'object';
BEGIN
  IF event IS NULL OR event ->> 'id' IS NULL OR event ->> 'type' IS NULL THEN
    PERFORM billing._invalid('event', 'must be a Stripe event with id and type');
  END IF;
  v_answer := api.ingest_webhook('stripe', event ->> 'id', event ->> 'type', event);
  v_outcome := billing._reconcile_outcome(v_answer);
  -- Another org's entry is recorded where it is met (billing._money_outcome, 'other_org').
  IF v_outcome = 'mismatch' AND v_answer -> 'result' ->> 'reason' IS DISTINCT FROM 'other_org' THEN
    PERFORM billing._record_discrepancy(
      run_id, 'stripe', 'amount_mismatch', coalesce(o ->> 'payment_intent', o ->> 'id'),
      billing._uuid_or_null(v_answer ->> 'org_id'),
      pg_catalog.jsonb_build_object('event', event ->> 'id', 'stripe_amount',
                                    coalesce(o -> 'amount_total', o -> 'amount_received', o -> 'amount'),
                                    'ledger_entry_id', v_answer -> 'result' -> 'entry_id'));
  END IF;
  PERFORM billing._count_in_run(run_id, v_outcome,
                                pg_catalog.to_timestamp((event ->> 'created')::double precision));
  RETURN pg_catalog.jsonb_build_object('outcome', v_outcome, 'answer', v_answer);
END
$$;
GRANT EXECUTE ON FUNCTION api.reconcile_stripe_event(bigint, jsonb) TO service_role;


-- Ledger credits from Stripe in the window whose PaymentIntent Stripe did not list: phantoms.
CREATE OR REPLACE FUNCTION api.record_stripe_phantoms(run_id bigint, known_payment_intents text[])
  RETURNS integer
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  run billing.reconciliation_runs;
  e billing.ledger_entries;
  v_count integer := 0;
BEGIN
  SELECT * INTO run FROM billing.reconciliation_runs AS r WHERE r.id = record_stripe_phantoms.run_id;
  IF NOT FOUND THEN
    PERFORM billing._invalid('run_id', 'no such reconciliation run');
  END IF;
  FOR e IN SELECT * FROM billing.ledger_entries AS le
            WHERE le.provider_ref LIKE 'stripe:payment_intent:%'
              AND le.occurred_at >= run.window_start AND le.occurred_at <= run.window_end
              AND NOT (pg_catalog.substr(le.provider_ref, 23) = ANY (coalesce(known_payment_intents, '{}'))) LOOP
    PERFORM billing._record_discrepancy(
      run.id, 'stripe', 'phantom', pg_catalog.substr(e.provider_ref, 23), e.org_id,
      pg_catalog.jsonb_build_object('ledger_entry_id', e.id, 'amount_minor', e.amount_minor,
                                    'created_at', e.created_at));
    v_count := v_count + 1;
  END LOOP;
  RETURN v_count;
END
$$;
GRANT EXECUTE ON FUNCTION api.record_stripe_phantoms(bigint, text[]) TO service_role;

-- One Vapi Call object from GET /call: an ended call the ledger lacks is charged (same
-- attribution and pricing as the end-of-call report); a different duration is a mismatch.
CREATE OR REPLACE FUNCTION api.reconcile_vapi_call(run_id bigint, call jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_answer jsonb;
  v_outcome text;
  v_error text;
BEGIN
  IF call IS NULL OR call ->> 'id' IS NULL THEN
    PERFORM billing._invalid('call', 'must be a Vapi call with an id');
  END IF;
  IF call ->> 'status' IS DISTINCT FROM 'ended' THEN
    v_outcome := 'not_ended';
  ELSE
    BEGIN
      v_answer := billing._charge_vapi_call(call, call ->> 'startedAt', call ->> 'endedAt', 'reconciliation');
      v_outcome := billing._reconcile_outcome(v_answer);
    EXCEPTION WHEN OTHERS THEN
      -- One call that cannot be charged (its org has no wallet, say) must not stop the run:
      -- it is recorded for an operator and the run goes on to the next call.
      GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
      v_outcome := 'unchargeable';
      PERFORM billing._record_discrepancy(
        run_id, 'vapi', 'unchargeable', call ->> 'id', NULL,
        pg_catalog.jsonb_build_object('error', SQLSTATE || ': ' || v_error,
                                      'org_id', billing._vapi_call_org(call), 'ended_at', call ->> 'endedAt'));
    END;
    IF v_outcome = 'unattributed' THEN
      PERFORM billing._record_discrepancy(
        run_id, 'vapi', 'unattributed', call ->> 'id', NULL,
        pg_catalog.jsonb_build_object('assistant_id', call ->> 'assistantId',
                                      'phone_number_id', call ->> 'phoneNumberId',
                                      'ended_at', call ->> 'endedAt'));
    END IF;
  END IF;
  PERFORM billing._count_in_run(run_id, v_outcome, (call ->> 'updatedAt')::timestamptz);
  RETURN pg_catalog.jsonb_build_object('outcome', v_outcome, 'answer', v_answer);
END
$$;
GRANT EXECUTE ON FUNCTION api.reconcile_vapi_call(bigint, jsonb) TO service_role;


-- The SMS a Twilio run asks Twilio about, oldest first: registered in the run's window and either
-- still held past the grace (its callback is late) or expired with an open unsettled_sms
-- discrepancy (its callback never came). Chosen by state, so a resumed run asks again about
-- exactly what is still unsettled.
CREATE OR REPLACE FUNCTION api.twilio_reconciliation_candidates(run_id bigint)
  RETURNS SETOF text
  LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  run billing.reconciliation_runs;
  v_until timestamptz;
BEGIN
  SELECT * INTO run FROM billing.reconciliation_runs AS r
   WHERE r.id = twilio_reconciliation_candidates.run_id AND r.provider = 'twilio';
  IF NOT FOUND THEN
    PERFORM billing._invalid('run_id', 'no such Twilio reconciliation run');
  END IF;
  v_until := run.window_end - (billing._settings()).reconcile_sms_grace;
  -- Two small sets, each found through its partial "open" index, not a scan of every hold.
  RETURN QUERY
    SELECT c.ref FROM (
      SELECT h.ref, h.created_at, h.id FROM billing.holds AS h
       WHERE h.status = 'open' AND h.purpose = 'sms'
         AND h.created_at >= run.window_start AND h.created_at <= v_until
      UNION
      SELECT h.ref, h.created_at, h.id FROM billing.discrepancies AS d
        JOIN billing.holds AS h ON h.purpose = 'sms' AND h.ref = d.ref
       WHERE d.status = 'open' AND d.provider = 'twilio' AND d.kind = 'unsettled_sms'
         AND h.created_at >= run.window_start AND h.created_at <= v_until) AS c
    ORDER BY c.created_at, c.id;
END
$$;
GRANT EXECUTE ON FUNCTION api.twilio_reconciliation_candidates(bigint) TO service_role;

-- One SMS as Twilio knows it: `message` is its Message resource (GET /2010-04-01/Accounts/{Sid}/
-- Messages/{Sid}.json), or Twilio's error answer (no `sid`) when Twilio has no such message. A
-- status Twilio has decided goes through the status callback's own path (inbox event
-- '<sid>:<status>', then billing._settle_sms), so the callback and this charge once between them.
-- A settled SMS closes its unsettled_sms discrepancy; one still in flight or unknown to Twilio
-- keeps it open, with what Twilio said, counted in this run.
CREATE OR REPLACE FUNCTION api.reconcile_twilio_message(run_id bigint, message_sid text, message jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  -- Twilio's error answer carries an HTTP `status` too: only a resource's status is the message's.
  v_status text := CASE WHEN message ->> 'sid' IS NOT NULL THEN message ->> 'status' END;
  v_answer jsonb;
  v_outcome text;
  v_entry_id bigint;
  v_settled boolean;
BEGIN
  PERFORM billing._check_key('message_sid', message_sid);
  IF message IS NULL OR pg_catalog.jsonb_typeof(message) <> 'object'
     OR coalesce(message ->> 'sid', message_sid) <> message_sid THEN
    PERFORM billing._invalid('message', 'must be the Message resource of message_sid, or Twilio''s error');
  END IF;

  IF message ->> 'sid' IS NULL THEN
    v_outcome := 'not_found';
  ELSIF billing._sms_status_rule(v_status) IN ('charged', 'released') THEN
    -- Twilio has decided (billing._sms_statuses): exactly what the callback would say.
    v_answer := api.ingest_webhook(
      'twilio', message_sid || ':' || v_status, 'message.' || v_status,
      pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
        'MessageSid', message_sid, 'MessageStatus', v_status, 'ErrorCode', message ->> 'error_code',
        'AccountSid', message ->> 'account_sid', 'From', message ->> 'from', 'To', message ->> 'to',
        'ApiVersion', message ->> 'api_version', 'ReconciliationRunId', reconcile_twilio_message.run_id)));
    v_outcome := CASE WHEN billing._sms_status_rule(v_status) = 'released' THEN 'not_billable'
                      ELSE billing._reconcile_outcome(v_answer) END;
  ELSE
    -- Still in flight (or a status this ledger does not know): undecided.
    v_outcome := 'in_flight';
  END IF;

  -- Settled means charged (under the key billing._settle_sms charges) or nothing owed.
  SELECT e.id INTO v_entry_id FROM billing.ledger_entries AS e
   WHERE e.provider_ref = 'twilio:message:' || message_sid;
  v_settled := v_entry_id IS NOT NULL OR v_outcome = 'not_billable';
  IF v_settled THEN
    UPDATE billing.discrepancies AS d
       SET status = 'resolved', resolved_at = now(),
           evidence = d.evidence || pg_catalog.jsonb_build_object('twilio_status', v_status),
           resolution = pg_catalog.format(
             'resolved automatically by Twilio reconciliation run %s: Twilio says %s, %s',
             reconcile_twilio_message.run_id, v_status,
             coalesce('charged by ledger entry ' || v_entry_id, 'nothing to bill'))
     WHERE d.provider = 'twilio' AND d.kind = 'unsettled_sms' AND d.ref = message_sid AND d.status = 'open';
  ELSE
    UPDATE billing.discrepancies AS d
       SET run_id = reconcile_twilio_message.run_id,
           evidence = (d.evidence - 'twilio_status' - 'twilio_error')
                      || pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
                           'twilio_status', v_status,
                           'twilio_error', CASE WHEN v_outcome = 'not_found' THEN message END,
                           'checked_at', now()))
     WHERE d.provider = 'twilio' AND d.kind = 'unsettled_sms' AND d.ref = message_sid AND d.status = 'open';
  END IF;
  PERFORM billing._count_in_run(reconcile_twilio_message.run_id, v_outcome, NULL);
  RETURN pg_catalog.jsonb_build_object('outcome', v_outcome, 'settled', v_settled, 'answer', v_answer);
END
$$;
GRANT EXECUTE ON FUNCTION api.reconcile_twilio_message(bigint, text, jsonb) TO service_role;

-- One provider object as the shim read it, through the provider's function above: a Stripe event
-- (api.reconcile_stripe_event), a Vapi call (api.reconcile_vapi_call) or a Twilio Message
-- (api.reconcile_twilio_message, `ref` its sid). `object` is its JSON text and `ref` its id as
-- the shim read it (a digest of the text when it has none). An object that cannot be read
-- (PostgreSQL refuses \u0000, lone surrogates, NaN) or applied is rolled back, recorded by
-- billing._record_unreadable, and the run goes on: one poison object never blocks the rest.
CREATE OR REPLACE FUNCTION api.reconcile_object(run_id bigint, provider text, ref text, object text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_error text;
BEGIN
  IF provider IS NULL OR provider NOT IN ('stripe', 'vapi', 'twilio') THEN
    PERFORM billing._invalid('provider', 'must be stripe, vapi or twilio');
  END IF;
  PERFORM billing._check_key('ref', ref);
  IF object IS NULL THEN
    PERFORM billing._invalid('object', 'must not be null');
  END IF;
  BEGIN
    RETURN CASE reconcile_object.provider
      WHEN 'stripe' THEN api.reconcile_stripe_event(reconcile_object.run_id, reconcile_object.object::jsonb)
      WHEN 'vapi' THEN api.reconcile_vapi_call(reconcile_object.run_id, reconcile_object.object::jsonb)
      ELSE api.reconcile_twilio_message(reconcile_object.run_id, reconcile_object.ref,
                                        reconcile_object.object::jsonb)
    END;
  EXCEPTION
    -- Contention is not the object's fault: the run fails and resumes from its cursor.
    WHEN serialization_failure OR deadlock_detected OR lock_not_available THEN
      RAISE;
    WHEN OTHERS THEN
      GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
      RETURN billing._record_unreadable(reconcile_object.run_id, reconcile_object.provider,
                                        reconcile_object.ref, SQLSTATE || ': ' || v_error,
                                        reconcile_object.object);
  END;
END
$$;
GRANT EXECUTE ON FUNCTION api.reconcile_object(bigint, text, text, text) TO service_role;

-- Close a run with its final status and the number of discrepancies it found.
CREATE OR REPLACE FUNCTION api.finish_reconciliation_run(run_id bigint, status text, error text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  run billing.reconciliation_runs;
BEGIN
  IF status IS NULL OR status NOT IN ('completed', 'failed') THEN
    PERFORM billing._invalid('status', 'must be completed or failed');
  END IF;
  UPDATE billing.reconciliation_runs AS r
     SET status = finish_reconciliation_run.status, error = finish_reconciliation_run.error,
         finished_at = now(),
         discrepancies = (SELECT count(*) FROM billing.discrepancies AS d WHERE d.run_id = r.id)
   WHERE r.id = finish_reconciliation_run.run_id
  RETURNING * INTO run;
  IF NOT FOUND THEN
    PERFORM billing._invalid('run_id', 'no such reconciliation run');
  END IF;
  RETURN pg_catalog.to_jsonb(run);
END
$$;
GRANT EXECUTE ON FUNCTION api.finish_reconciliation_run(bigint, text, text) TO service_role;

-- Whether a provider's scheduled reconciliation is due (the worker asks every pass), and the
-- window it should cover. A failed run is retried after 10 minutes, not at every pass.
CREATE OR REPLACE FUNCTION api.reconciliation_due(provider text)
  RETURNS jsonb
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  SELECT pg_catalog.jsonb_build_object(
    'due', coalesce(max(r.started_at) FILTER (WHERE r.status IN ('completed', 'running'))
                      < now() - s.reconcile_every, true)
           AND coalesce(max(r.started_at) FILTER (WHERE r.status = 'failed')
                          < now() - interval '10 minutes', true),
    'lookback_seconds', EXTRACT(EPOCH FROM CASE reconciliation_due.provider
                                             WHEN 'stripe' THEN s.reconcile_stripe_lookback
                                             WHEN 'twilio' THEN s.reconcile_twilio_lookback
                                             ELSE s.reconcile_vapi_lookback END))
    FROM billing.settings AS s
    LEFT JOIN billing.reconciliation_runs AS r ON r.provider = reconciliation_due.provider
   GROUP BY s.reconcile_every, s.reconcile_stripe_lookback, s.reconcile_vapi_lookback,
            s.reconcile_twilio_lookback
$$;
GRANT EXECUTE ON FUNCTION api.reconciliation_due(text) TO service_role;

-- The window of the provider's latest failed run, for `creditledger reconcile ... --resume`.
CREATE OR REPLACE FUNCTION api.failed_reconciliation_window(provider text)
  RETURNS jsonb
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
AS $$
  SELECT pg_catalog.jsonb_build_object('run_id', r.id, 'window_start', r.window_start,
                                       'window_end', r.window_end)
    FROM billing.reconciliation_runs AS r
   WHERE r.provider = failed_reconciliation_window.provider AND r.status = 'failed'
   ORDER BY r.id DESC LIMIT 1
$$;
GRANT EXECUTE ON FUNCTION api.failed_reconciliation_window(text) TO service_role;

-- An operator closes a discrepancy, saying what was done about it.
CREATE OR REPLACE FUNCTION api.resolve_discrepancy(discrepancy_id bigint, resolution text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  d billing.discrepancies;
BEGIN
  IF resolution IS NULL OR pg_catalog.length(resolution) < 3 THEN
    PERFORM billing._invalid('resolution', 'say what was done (at least 3 characters)');
  END IF;
  UPDATE billing.discrepancies AS x
     SET status = 'resolved', resolution = resolve_discrepancy.resolution, resolved_at = now()
   WHERE x.id = discrepancy_id AND x.status = 'open'
  RETURNING * INTO d;
  IF NOT FOUND THEN
    PERFORM billing._invalid('discrepancy_id', 'no open discrepancy with this id');
  END IF;
  RETURN pg_catalog.to_jsonb(d);
END
$$;
GRANT EXECUTE ON FUNCTION api.resolve_discrepancy(bigint, text) TO service_role;
