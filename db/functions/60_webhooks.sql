-- The webhook inbox: every event is stored and applied in one transaction, or stored as failed
-- for the worker. What each provider's event means is decided here, not in Python.

-- A uuid from untrusted text, or null (a bad org id in metadata must not fail the event).
CREATE OR REPLACE FUNCTION billing._uuid_or_null(p_text text)
  RETURNS uuid
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN p_text::uuid;
EXCEPTION WHEN invalid_text_representation THEN
  RETURN NULL;
END
$$;

-- What interpreting an event left behind: the inbox status, the org and the money result.
CREATE OR REPLACE FUNCTION billing._outcome(
  p_status text, p_org_id uuid, p_result api.op_result DEFAULT NULL, p_note text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
             'status', p_status, 'org_id', p_org_id, 'note', p_note))
           || CASE WHEN p_result.status IS NOT NULL
                   THEN pg_catalog.jsonb_build_object('result', pg_catalog.to_jsonb(p_result))
                   ELSE '{}' END;
END
$$;

-- Turn a money result into an inbox outcome: a currency mismatch is stored, not applied, and
-- raised as a discrepancy; so is a provider object another org's entry already holds (stored as
-- 'conflict': money taken or owed that moved nowhere must reach an operator); an unknown org is
-- a failure the worker retries (the wallet may be opened later); everything else is processed.
CREATE OR REPLACE FUNCTION billing._money_outcome(
  p_org_id uuid, r api.op_result, p_provider text, p_ref text, p_evidence jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  IF r.reason = 'unknown_org' THEN
    RAISE EXCEPTION USING ERRCODE = 'P0002',
      MESSAGE = pg_catalog.format('no wallet for org %s', p_org_id);
  ELSIF r.reason = 'currency_mismatch' THEN
    INSERT INTO billing.discrepancies (provider, kind, ref, org_id, evidence)
    VALUES (p_provider, 'currency_mismatch', p_ref, p_org_id, p_evidence)
    ON CONFLICT DO NOTHING;
    RETURN billing._outcome('ignored', p_org_id, r, 'currency_mismatch');
  ELSIF r.status = 'conflict' AND r.reason = 'other_org' THEN
    INSERT INTO billing.discrepancies (provider, kind, ref, org_id, evidence)
    VALUES (p_provider, 'other_org', p_ref, p_org_id,
            p_evidence || pg_catalog.jsonb_build_object('result', pg_catalog.to_jsonb(r)))
    ON CONFLICT DO NOTHING;
    RETURN billing._outcome('conflict', p_org_id, r, 'other_org');
  END IF;
  RETURN billing._outcome('processed', p_org_id, r);
END
$$;

-- Credit a Stripe payment, keyed on its PaymentIntent whichever event (or the worker) reports
-- it first: Checkout completion and payment_intent.succeeded credit once between them.
CREATE OR REPLACE FUNCTION billing._credit_stripe_payment(
  p_org_id uuid, p_payment_intent_id text, p_amount_minor bigint, p_currency text,
  p_kind text, p_details jsonb, p_occurred_at timestamptz)
  RETURNS api.op_result
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN billing._move_money(
      p_org_id, p_amount_minor, p_kind, 'stripe:payment_intent:' || p_payment_intent_id,
      pg_catalog.jsonb_build_object('op', 'stripe_payment', 'org_id', p_org_id,
                                    'payment_intent', p_payment_intent_id,
                                    'amount_minor', p_amount_minor, 'kind', p_kind),
      'stripe', 'stripe:payment_intent:' || p_payment_intent_id,
      p_details || pg_catalog.jsonb_build_object('payment_intent', p_payment_intent_id),
      p_occurred_at, lower(p_currency));
END
$$;

-- The org a Stripe payment was credited to, or an error (retried by the worker): a refund or
-- dispute for a payment this system never credited is not applied to a guessed org.
CREATE OR REPLACE FUNCTION billing._stripe_payment_org(p_payment_intent_id text)
  RETURNS uuid
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_org uuid;
BEGIN
  SELECT org_id INTO v_org FROM billing.ledger_entries
   WHERE provider_ref = 'stripe:payment_intent:' || p_payment_intent_id;
  IF v_org IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'P0002',
      MESSAGE = pg_catalog.format('payment %s has not been credited (yet)', p_payment_intent_id);
  END IF;
  RETURN v_org;
END
$$;

-- Move money for one step of a refund or dispute of a credited payment, keyed on that step.
CREATE OR REPLACE FUNCTION billing._stripe_adjustment(
  p_payment_intent_id text, p_amount_minor bigint, p_currency text, p_kind text, p_ref text,
  p_object jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_org uuid := billing._stripe_payment_org(p_payment_intent_id);
  r api.op_result;
BEGIN
  IF p_amount_minor IS NULL OR p_amount_minor = 0 THEN
    RETURN billing._outcome('ignored', v_org, NULL, 'zero_amount');
  END IF;
  r := billing._move_money(
    v_org, p_amount_minor, p_kind, p_ref,
    pg_catalog.jsonb_build_object('op', p_kind, 'ref', p_ref, 'amount_minor', p_amount_minor),
    'stripe', p_ref,
    pg_catalog.jsonb_build_object('payment_intent', p_payment_intent_id,
                                  'stripe_object', p_object ->> 'id', 'status', p_object ->> 'status'),
    coalesce(pg_catalog.to_timestamp((p_object ->> 'created')::double precision), now()),
    lower(p_currency));
  RETURN billing._money_outcome(v_org, r, 'stripe', p_ref,
                                pg_catalog.jsonb_build_object('object', p_object ->> 'id',
                                                              'currency', p_currency));
END
$$;

-- One Stripe refund object: debit once per refund id (never from the charge's cumulative
-- amount_refunded); a refund that later fails or is canceled is credited back once.
CREATE OR REPLACE FUNCTION billing._apply_stripe_refund(p_refund jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_id text := p_refund ->> 'id';
  v_pi text := p_refund ->> 'payment_intent';
  v_amount bigint := (p_refund ->> 'amount')::bigint;
BEGIN
  IF v_pi IS NULL THEN
    RETURN billing._outcome('ignored', NULL, NULL, 'refund_without_payment_intent');
  END IF;
  IF p_refund ->> 'status' IN ('failed', 'canceled') THEN
    IF NOT EXISTS (SELECT 1 FROM billing.ledger_entries WHERE provider_ref = 'stripe:refund:' || v_id) THEN
      -- Failed before we debited it: remember, so that a late refund.created debits nothing.
      INSERT INTO billing.failed_refunds (refund_id, status) VALUES (v_id, p_refund ->> 'status')
      ON CONFLICT DO NOTHING;
      RETURN billing._outcome('ignored', NULL, NULL, 'refund_failed_before_debit');
    END IF;
    RETURN billing._stripe_adjustment(v_pi, v_amount, p_refund ->> 'currency', 'refund_reversal',
                                      'stripe:refund:' || v_id || ':reversed', p_refund);
  END IF;
  IF EXISTS (SELECT 1 FROM billing.failed_refunds WHERE refund_id = v_id) THEN
    RETURN billing._outcome('ignored', NULL, NULL, 'refund_already_failed');
  END IF;
  RETURN billing._stripe_adjustment(v_pi, -v_amount, p_refund ->> 'currency', 'refund',
                                    'stripe:refund:' || v_id, p_refund);
END
$$;

-- Every refund listed on a charge.refunded event's charge (when Stripe included the list).
CREATE OR REPLACE FUNCTION billing._apply_stripe_charge_refunds(p_charge jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_refund jsonb;
  v_results jsonb := '[]'::jsonb;
  v_last jsonb;
BEGIN
  IF pg_catalog.jsonb_typeof(p_charge -> 'refunds' -> 'data') IS DISTINCT FROM 'array' THEN
    -- Recent API versions do not expand charge.refunds: the refund.* events carry each refund.
    RETURN billing._outcome('ignored', NULL, NULL, 'refunds_not_listed');
  END IF;
  FOR v_refund IN SELECT * FROM pg_catalog.jsonb_array_elements(p_charge -> 'refunds' -> 'data') LOOP
    v_last := billing._apply_stripe_refund(
      v_refund || pg_catalog.jsonb_build_object(
        'payment_intent', coalesce(v_refund ->> 'payment_intent', p_charge ->> 'payment_intent')));
    v_results := v_results || pg_catalog.jsonb_build_array(v_last -> 'result');
  END LOOP;
  RETURN pg_catalog.jsonb_build_object('status', 'processed', 'org_id', v_last -> 'org_id',
                                       'refunds', v_results);
END
$$;

-- Stripe: what each event type means for the ledger.
CREATE OR REPLACE FUNCTION billing._apply_stripe_event(p_type text, p_event jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  o jsonb := p_event -> 'data' -> 'object';
  -- When the payment happened at Stripe, not when we heard of it (reconciliation compares these).
  v_occurred_at timestamptz := coalesce(
    pg_catalog.to_timestamp((p_event ->> 'created')::double precision), now());
  v_org uuid;
  v_amount bigint;
  v_claim bigint;
  r api.op_result;
BEGIN
  CASE
  WHEN p_type IN ('checkout.session.completed', 'checkout.session.async_payment_succeeded') THEN
    IF o ->> 'payment_status' IS DISTINCT FROM 'paid' THEN
      -- Delayed payment methods complete unpaid; async_payment_succeeded follows.
      RETURN billing._outcome('ignored', NULL, NULL, 'not_paid');
    END IF;
    v_amount := (o ->> 'amount_total')::bigint;
    IF coalesce(v_amount, 0) = 0 THEN
      RETURN billing._outcome('ignored', NULL, NULL, 'zero_amount');
    END IF;
    v_org := billing._uuid_or_null(coalesce(o ->> 'client_reference_id', o -> 'metadata' ->> 'org_id'));
    IF v_org IS NULL THEN
      RETURN billing._outcome('unattributed', NULL, NULL, 'no_org_on_session');
    END IF;
    r := billing._credit_stripe_payment(
      v_org, coalesce(o ->> 'payment_intent', o ->> 'id'), v_amount, o ->> 'currency', 'top_up',
      pg_catalog.jsonb_build_object('checkout_session', o ->> 'id', 'event', p_event ->> 'id'),
      v_occurred_at);
    UPDATE billing.checkout_requests SET status = 'completed', updated_at = now()
     WHERE session_id = o ->> 'id' AND r.status IN ('applied', 'duplicate');
    RETURN billing._money_outcome(v_org, r, 'stripe', o ->> 'id',
                                  pg_catalog.jsonb_build_object('currency', o ->> 'currency'));

  WHEN p_type = 'payment_intent.succeeded' THEN
    v_org := billing._uuid_or_null(o -> 'metadata' ->> 'org_id');
    IF v_org IS NULL THEN
      RETURN billing._outcome('ignored', NULL, NULL, 'not_a_creditledger_payment');
    END IF;
    v_amount := coalesce((o ->> 'amount_received')::bigint, (o ->> 'amount')::bigint);
    v_claim := (o -> 'metadata' ->> 'recharge_claim_id')::bigint;
    IF v_claim IS NOT NULL THEN
      r := billing._recharge_succeeded(v_claim, o ->> 'id', v_amount, o ->> 'currency',
                                       pg_catalog.jsonb_build_object('event', p_event ->> 'id'),
                                       v_occurred_at);
    ELSE
      r := billing._credit_stripe_payment(v_org, o ->> 'id', v_amount, o ->> 'currency', 'top_up',
                                          pg_catalog.jsonb_build_object('event', p_event ->> 'id'),
                                          v_occurred_at);
    END IF;
    RETURN billing._money_outcome(v_org, r, 'stripe', o ->> 'id',
                                  pg_catalog.jsonb_build_object('currency', o ->> 'currency'));

  WHEN p_type = 'payment_intent.payment_failed' THEN
    v_claim := (o -> 'metadata' ->> 'recharge_claim_id')::bigint;
    IF v_claim IS NULL THEN
      RETURN billing._outcome('ignored', NULL, NULL, 'not_a_recharge');
    END IF;
    r := billing._recharge_failed(v_claim,
           coalesce(o -> 'last_payment_error' ->> 'decline_code', o -> 'last_payment_error' ->> 'code'),
           o ->> 'id');
    RETURN billing._outcome('processed', billing._uuid_or_null(o -> 'metadata' ->> 'org_id'), r);

  WHEN p_type = 'charge.refunded' THEN
    RETURN billing._apply_stripe_charge_refunds(o);

  WHEN p_type IN ('refund.created', 'refund.updated', 'refund.failed', 'charge.refund.updated') THEN
    RETURN billing._apply_stripe_refund(o);

  WHEN p_type = 'charge.dispute.created' AND o ->> 'status' LIKE 'warning\_%' THEN
    -- An inquiry (warning_needs_response, ...): Stripe withdraws no funds for it.
    RETURN billing._outcome('ignored', NULL, NULL, 'inquiry_no_funds_withdrawn');

  WHEN p_type IN ('charge.dispute.created', 'charge.dispute.funds_withdrawn') THEN
    RETURN billing._stripe_adjustment(o ->> 'payment_intent', -(o ->> 'amount')::bigint,
                                      o ->> 'currency', 'dispute',
                                      'stripe:dispute:' || (o ->> 'id') || ':withdrawn', o);

  WHEN p_type = 'charge.dispute.funds_reinstated'
       OR (p_type = 'charge.dispute.closed' AND o ->> 'status' = 'won') THEN
    IF NOT EXISTS (SELECT 1 FROM billing.ledger_entries
                    WHERE provider_ref = 'stripe:dispute:' || (o ->> 'id') || ':withdrawn') THEN
      -- Reinstating what was never withdrawn here must wait for the withdrawal.
      RAISE EXCEPTION USING ERRCODE = 'P0002',
        MESSAGE = pg_catalog.format('dispute %s was not debited (yet)', o ->> 'id');
    END IF;
    RETURN billing._stripe_adjustment(o ->> 'payment_intent', (o ->> 'amount')::bigint,
                                      o ->> 'currency', 'dispute_reversal',
                                      'stripe:dispute:' || (o ->> 'id') || ':reinstated', o);
  ELSE
    RETURN billing._outcome('ignored', NULL, NULL, 'unhandled_type');
  END CASE;
END
$$;

-- The org of a Vapi call, as this server decided it: the org whose hold admitted (or refused)
-- the call, else the routing table by assistant, then by phone number. Fields a caller can set
-- (assistantOverrides.metadata: a browser sets it with Vapi's public key) never choose the payer.
CREATE OR REPLACE FUNCTION billing._vapi_call_org(p_call jsonb)
  RETURNS uuid
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN coalesce(
      (SELECT org_id FROM billing.holds WHERE purpose = 'call' AND ref = p_call ->> 'id'),
      (SELECT org_id FROM billing.vapi_routes WHERE kind = 'assistant' AND vapi_id = p_call ->> 'assistantId'),
      (SELECT org_id FROM billing.vapi_routes WHERE kind = 'phone_number' AND vapi_id = p_call ->> 'phoneNumberId'));
END
$$;

-- When what the caller's metadata claims (assistantOverrides.metadata.org_id, or a metadata
-- object on the call) is not the org this server charges, say so: an attribution_mismatch
-- discrepancy with both orgs. The claim itself changes nothing.
CREATE OR REPLACE FUNCTION billing._note_claimed_org(p_call jsonb, p_org_id uuid)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_claim text := coalesce(p_call -> 'assistantOverrides' -> 'metadata' ->> 'org_id',
                           p_call -> 'metadata' ->> 'org_id');
BEGIN
  IF v_claim IS NOT NULL AND v_claim IS DISTINCT FROM p_org_id::text THEN
    INSERT INTO billing.discrepancies (provider, kind, ref, org_id, evidence)
    VALUES ('vapi', 'attribution_mismatch', p_call ->> 'id', p_org_id,
            pg_catalog.jsonb_build_object('charged_org_id', p_org_id, 'claimed_org_id', v_claim,
                                          'assistant_id', p_call ->> 'assistantId',
                                          'phone_number_id', p_call ->> 'phoneNumberId'))
    ON CONFLICT DO NOTHING;
  END IF;
END
$$;

-- A call's billable seconds: endedAt - startedAt rounded up; 0 when it never connected.
CREATE OR REPLACE FUNCTION billing._vapi_duration_seconds(p_started text, p_ended text)
  RETURNS integer
  LANGUAGE plpgsql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN CASE WHEN p_started IS NULL OR p_ended IS NULL THEN 0
      ELSE GREATEST(0, pg_catalog.ceil(EXTRACT(EPOCH FROM p_ended::timestamptz - p_started::timestamptz)))::integer
    END;
END
$$;

-- Charge one ended Vapi call (the webhook's end-of-call report and reconciliation both come
-- here) to the org this server attributes it to.
CREATE OR REPLACE FUNCTION billing._charge_vapi_call(p_call jsonb, p_started text, p_ended text, p_source text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_org uuid := billing._vapi_call_org(p_call);
  v_duration integer := billing._vapi_duration_seconds(p_started, p_ended);
  r api.op_result;
BEGIN
  PERFORM billing._note_claimed_org(p_call, v_org);
  IF v_org IS NULL THEN
    RETURN billing._outcome('unattributed', NULL, NULL, 'no_org_for_call');
  END IF;
  r := api.deduct_call_credits(
    v_org, p_call ->> 'id', v_duration,
    pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
      'started_at', p_started, 'ended_at', p_ended, 'ended_reason', p_call ->> 'endedReason',
      'assistant_id', p_call ->> 'assistantId', 'recorded_by', p_source)));
  RETURN billing._money_outcome(v_org, r, 'vapi', p_call ->> 'id', '{}');
END
$$;

-- An inbox outcome for an admission, with what the shim answers Vapi (`answer`, relayed as it
-- is): the org's assistant with maxDurationSeconds set to the admitted seconds, or the sentence
-- Vapi speaks to a refused caller.
CREATE OR REPLACE FUNCTION billing._admission_outcome(
  p_org_id uuid, a api.admission, p_assistant_id text, p_note text DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  RETURN pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
      'status', CASE WHEN p_org_id IS NULL THEN 'unattributed' ELSE 'processed' END,
      'org_id', p_org_id, 'note', p_note))
    || pg_catalog.jsonb_build_object(
      'result', pg_catalog.to_jsonb(a),
      'answer', CASE
        WHEN a.max_duration_seconds IS NOT NULL AND p_assistant_id IS NOT NULL THEN
          pg_catalog.jsonb_build_object(
            'assistantId', p_assistant_id,
            'assistantOverrides', pg_catalog.jsonb_build_object(
              'maxDurationSeconds', a.max_duration_seconds,
              'metadata', pg_catalog.jsonb_build_object('org_id', p_org_id,
                                                        'admitted_seconds', a.max_duration_seconds)))
        ELSE pg_catalog.jsonb_build_object('error', (billing._settings()).call_refused_message)
      END);
END
$$;

-- Vapi's assistant-request (an inbound call, before it is answered): the org is the phone
-- number's route, the assistant the one set for it (api.set_inbound_assistant); the call is
-- admitted for what the wallet affords, or refused. A number without an inbound assistant is
-- refused and stored unattributed (an alert): an operator sets its route.
CREATE OR REPLACE FUNCTION billing._answer_assistant_request(m jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_call jsonb := m -> 'call';
  v_number text := coalesce(m -> 'phoneNumber' ->> 'id', v_call ->> 'phoneNumberId');
  route billing.vapi_routes;
BEGIN
  IF v_call ->> 'id' IS NULL THEN
    RETURN billing._admission_outcome(NULL, ROW('rejected', NULL, NULL, NULL, 'no_call'), NULL)
           || pg_catalog.jsonb_build_object('status', 'ignored');
  END IF;
  SELECT * INTO route FROM billing.vapi_routes AS r WHERE r.kind = 'phone_number' AND r.vapi_id = v_number;
  IF route.assistant_id IS NULL THEN
    RETURN billing._admission_outcome(
      NULL, ROW('rejected', NULL, NULL, NULL, 'no_inbound_assistant'), NULL,
      'no_inbound_assistant_for_' || coalesce(v_number, 'a_call_without_phone_number'));
  END IF;
  RETURN billing._admission_outcome(
    route.org_id,
    billing._admit_call(billing._lock_wallet(route.org_id), v_call ->> 'id', NULL, 'vapi',
                        v_call -> 'monitor' ->> 'controlUrl'),
    route.assistant_id);
END
$$;

-- A call that started without admission (a web call, an outbound call placed elsewhere) is
-- admitted when Vapi says it is in progress; this system ends it through its control URL when
-- that is refused (now) or when its hold is about to run out (the worker, 36_call_ends.sql).
CREATE OR REPLACE FUNCTION billing._admit_started_call(p_call jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_org uuid := billing._vapi_call_org(p_call);
  a api.admission;
BEGIN
  PERFORM billing._note_claimed_org(p_call, v_org);
  IF v_org IS NULL THEN
    RETURN billing._outcome('unattributed', NULL, NULL, 'no_org_for_call');
  END IF;
  a := billing._admit_call(billing._lock_wallet(v_org), p_call ->> 'id', NULL, 'control_url',
                           p_call -> 'monitor' ->> 'controlUrl');
  IF a.status = 'rejected' THEN
    PERFORM billing._request_call_end(v_org, p_call ->> 'id', 'refused', p_call -> 'monitor' ->> 'controlUrl');
  END IF;
  RETURN pg_catalog.jsonb_build_object('status', 'processed', 'org_id', v_org,
                                       'result', pg_catalog.to_jsonb(a),
                                       'end_call', a.status = 'rejected');
END
$$;

-- Vapi server messages: assistant-request admits, status-update in-progress admits a call that
-- started without admission, end-of-call-report charges.
CREATE OR REPLACE FUNCTION billing._apply_vapi_message(p_type text, p_payload jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  m jsonb := coalesce(p_payload -> 'message', p_payload);
  v_call jsonb := m -> 'call';
BEGIN
  IF p_type = 'assistant-request' THEN
    RETURN billing._answer_assistant_request(m);
  END IF;
  IF v_call ->> 'id' IS NULL THEN
    RETURN billing._outcome('ignored', NULL, NULL, 'no_call');
  END IF;
  IF p_type = 'end-of-call-report' THEN
    RETURN billing._charge_vapi_call(
      v_call, coalesce(m ->> 'startedAt', v_call ->> 'startedAt'),
      coalesce(m ->> 'endedAt', v_call ->> 'endedAt'), 'webhook');
  ELSIF p_type = 'status-update' AND m ->> 'status' = 'in-progress' THEN
    RETURN billing._admit_started_call(v_call);
  ELSIF p_type = 'status-update' THEN
    -- 'ended' without a report is left to the report or to reconciliation; the hold expires.
    RETURN billing._outcome('ignored', NULL, NULL, 'status_' || coalesce(m ->> 'status', 'none'));
  END IF;
  RETURN billing._outcome('ignored', NULL, NULL, 'unhandled_type');
END
$$;

-- Twilio SMS status callbacks (form fields as a JSON object).
CREATE OR REPLACE FUNCTION billing._apply_twilio_status(p_payload jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_sid text := coalesce(p_payload ->> 'MessageSid', p_payload ->> 'SmsSid');
  v_status text := coalesce(p_payload ->> 'MessageStatus', p_payload ->> 'SmsStatus');
  v_org uuid;
  r api.op_result;
BEGIN
  IF v_sid IS NULL OR v_status IS NULL THEN
    RETURN billing._outcome('ignored', NULL, NULL, 'no_message_status');
  END IF;
  r := billing._settle_sms(v_sid, v_status,
         pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
           'status', v_status, 'error_code', p_payload ->> 'ErrorCode')));
  v_org := (SELECT org_id FROM billing.holds WHERE purpose = 'sms' AND ref = v_sid);
  IF r.reason = 'unknown_status' THEN
    RETURN billing._outcome('ignored', v_org, r);
  END IF;
  RETURN billing._money_outcome(v_org, r, 'twilio', v_sid, '{}');
END
$$;

-- Apply one event (its `attempts`-th try) and say what it did. A failure rolls back everything
-- the interpretation did (the EXCEPTION block is a savepoint) and is answered as status failed,
-- or dead after the operator's maximum of attempts, with the error.
CREATE OR REPLACE FUNCTION billing._interpret_event(
  p_provider text, p_event_type text, p_payload jsonb, p_attempts integer)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  v_error text;
BEGIN
  RETURN CASE p_provider
    WHEN 'stripe' THEN billing._apply_stripe_event(p_event_type, p_payload)
    WHEN 'vapi' THEN billing._apply_vapi_message(p_event_type, p_payload)
    WHEN 'twilio' THEN billing._apply_twilio_status(p_payload)
  END;
EXCEPTION WHEN OTHERS THEN
  GET STACKED DIAGNOSTICS v_error = MESSAGE_TEXT;
  RETURN pg_catalog.jsonb_build_object(
    'status', CASE WHEN p_attempts >= (billing._settings()).webhook_max_attempts THEN 'dead' ELSE 'failed' END,
    'error', SQLSTATE || ': ' || v_error);
END
$$;

-- When the worker tries a failed event again: exponential backoff from its attempts so far.
CREATE OR REPLACE FUNCTION billing._next_attempt_at(p_status text, p_attempts integer)
  RETURNS timestamptz
  LANGUAGE plpgsql STABLE SECURITY INVOKER SET search_path = ''
AS $$
BEGIN
  IF p_status <> 'failed' THEN
    RETURN NULL;
  END IF;
  RETURN now() + (billing._settings()).webhook_retry_base * power(2, LEAST(p_attempts - 1, 16));
END
$$;

-- The worker applies a stored failed event again and records what it left behind.
CREATE OR REPLACE FUNCTION billing._process_event(p_event_row_id bigint)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  ev billing.webhook_events;
  v_outcome jsonb;
BEGIN
  SELECT * INTO ev FROM billing.webhook_events WHERE id = p_event_row_id;
  v_outcome := billing._interpret_event(ev.provider, ev.event_type, ev.payload, ev.attempts);
  UPDATE billing.webhook_events
     SET status = v_outcome ->> 'status',
         org_id = billing._uuid_or_null(v_outcome ->> 'org_id'),
         result = v_outcome,
         last_error = v_outcome ->> 'error',
         next_attempt_at = billing._next_attempt_at(v_outcome ->> 'status', ev.attempts),
         processed_at = now()
   WHERE id = p_event_row_id;
  RETURN v_outcome || pg_catalog.jsonb_build_object('event_row_id', p_event_row_id);
END
$$;

-- Store a provider's event in the inbox and apply it in the same transaction. A redelivery
-- (same provider and event id) changes nothing and answers 'duplicate' with the first outcome.
CREATE OR REPLACE FUNCTION api.ingest_webhook(provider text, event_id text, event_type text, payload jsonb)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_row_id bigint;
  v_outcome jsonb;
  ev billing.webhook_events;
BEGIN
  IF provider IS NULL OR provider NOT IN ('stripe', 'vapi', 'twilio') THEN
    PERFORM billing._invalid('provider', 'must be stripe, vapi or twilio');
  END IF;
  PERFORM billing._check_key('event_id', event_id);
  PERFORM billing._check_key('event_type', event_type);
  IF payload IS NULL OR pg_catalog.jsonb_typeof(payload) <> 'object' THEN
    PERFORM billing._invalid('payload', 'must be a JSON object');
  END IF;

  -- Concurrent deliveries of one event queue here, so the first is applied and committed
  -- before the next looks for it (a transaction lock: released at commit, pooler-safe).
  PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtextextended(
    'creditledger.event:' || ingest_webhook.provider || ':' || ingest_webhook.event_id, 0));
  SELECT * INTO ev FROM billing.webhook_events AS we
   WHERE we.provider = ingest_webhook.provider AND we.event_id = ingest_webhook.event_id;
  IF FOUND THEN
    -- An assistant-request asked again gets the answer it got the first time.
    RETURN pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
             'status', 'duplicate', 'event_status', ev.status, 'event_row_id', ev.id,
             'answer', ev.result -> 'answer'))
           || pg_catalog.jsonb_build_object('result', ev.result -> 'result');
  END IF;

  -- Applied first, then stored once with what it did, in this same transaction: either both
  -- commit or neither. (Storing it first and updating it after cost a second, non-HOT version
  -- of a row of several KB and of all its index entries: measured in README, Benchmark.)
  v_outcome := billing._interpret_event(ingest_webhook.provider, ingest_webhook.event_type,
                                        ingest_webhook.payload, 1);
  INSERT INTO billing.webhook_events AS we (
    provider, event_id, event_type, payload, status, org_id, result, last_error, next_attempt_at,
    processed_at)
  VALUES (ingest_webhook.provider, ingest_webhook.event_id, ingest_webhook.event_type,
          ingest_webhook.payload, v_outcome ->> 'status', billing._uuid_or_null(v_outcome ->> 'org_id'),
          v_outcome, v_outcome ->> 'error', billing._next_attempt_at(v_outcome ->> 'status', 1), now())
  RETURNING we.id INTO v_row_id;
  RETURN v_outcome || pg_catalog.jsonb_build_object('event_row_id', v_row_id);
END
$$;
GRANT EXECUTE ON FUNCTION api.ingest_webhook(text, text, text, jsonb) TO service_role;

-- The worker's pass over failed events that are due: each re-applied, with one more attempt.
CREATE OR REPLACE FUNCTION api.retry_webhook_events(max_events integer DEFAULT 100)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_id bigint;
  v_counts jsonb := '{}'::jsonb;
  v_status text;
BEGIN
  IF max_events IS NULL OR max_events NOT BETWEEN 1 AND 10000 THEN
    PERFORM billing._invalid('max_events', 'must be between 1 and 10000');
  END IF;
  FOR v_id IN SELECT we.id FROM billing.webhook_events AS we
               WHERE we.status = 'failed' AND we.next_attempt_at <= now()
               ORDER BY we.next_attempt_at LIMIT max_events
               FOR UPDATE SKIP LOCKED LOOP
    UPDATE billing.webhook_events SET attempts = attempts + 1 WHERE id = v_id;
    v_status := billing._process_event(v_id) ->> 'status';
    v_counts := v_counts || pg_catalog.jsonb_build_object(
      v_status, coalesce((v_counts ->> v_status)::integer, 0) + 1);
  END LOOP;
  RETURN v_counts;
END
$$;
GRANT EXECUTE ON FUNCTION api.retry_webhook_events(integer) TO service_role;

-- An operator's decision on an event that is stuck (dead, unattributed, or failed): back to the
-- worker ('failed', attempts from zero, due now) or closed for good ('ignored', with the note).
CREATE OR REPLACE FUNCTION billing._operator_moves_event(p_event_row_id bigint, p_status text, p_note text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = ''
AS $$
DECLARE
  ev billing.webhook_events;
BEGIN
  UPDATE billing.webhook_events AS we
     SET status = p_status, last_error = p_note,
         attempts = CASE WHEN p_status = 'failed' THEN 0 ELSE we.attempts END,
         next_attempt_at = CASE WHEN p_status = 'failed' THEN now() END,
         processed_at = CASE WHEN p_status = 'failed' THEN we.processed_at ELSE now() END
   WHERE we.id = p_event_row_id AND we.status IN ('dead', 'unattributed', 'failed')
  RETURNING * INTO ev;
  IF NOT FOUND THEN
    PERFORM billing._invalid('event_row_id', 'no dead, unattributed or failed event with this id');
  END IF;
  RETURN pg_catalog.jsonb_build_object('event_row_id', ev.id, 'status', ev.status);
END
$$;

-- An operator sends a dead or unattributed event back to the worker (after fixing its cause,
-- e.g. adding a Vapi route): attempts restart from zero.
CREATE OR REPLACE FUNCTION api.replay_webhook_event(event_row_id bigint)
  RETURNS jsonb
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
  SELECT billing._operator_moves_event(event_row_id, 'failed', NULL)
$$;
GRANT EXECUTE ON FUNCTION api.replay_webhook_event(bigint) TO service_role;

-- An operator closes a dead or unattributed event that must never apply (a test event, a
-- payment handled by hand), saying why; it becomes 'ignored' and stops alerting. Moves no money.
CREATE OR REPLACE FUNCTION api.discard_webhook_event(event_row_id bigint, reason text)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
BEGIN
  IF reason IS NULL OR pg_catalog.length(reason) < 3 THEN
    PERFORM billing._invalid('reason', 'say why (at least 3 characters)');
  END IF;
  RETURN billing._operator_moves_event(event_row_id, 'ignored', 'discarded by an operator: ' || reason);
END
$$;
GRANT EXECUTE ON FUNCTION api.discard_webhook_event(bigint, text) TO service_role;

-- Route a Vapi assistant or phone number to an org: who pays for a call no admission holds.
CREATE OR REPLACE FUNCTION api.set_vapi_route(kind text, vapi_id text, org_id uuid)
  RETURNS void
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
BEGIN
  IF kind IS NULL OR kind NOT IN ('assistant', 'phone_number') THEN
    PERFORM billing._invalid('kind', 'must be assistant or phone_number');
  END IF;
  PERFORM billing._check_key('vapi_id', vapi_id);
  IF org_id IS NULL OR NOT EXISTS (SELECT 1 FROM billing.wallets AS w WHERE w.org_id = set_vapi_route.org_id) THEN
    PERFORM billing._invalid('org_id', 'must be an org with a wallet');
  END IF;
  INSERT INTO billing.vapi_routes AS r (kind, vapi_id, org_id)
  VALUES (set_vapi_route.kind, set_vapi_route.vapi_id, set_vapi_route.org_id)
  ON CONFLICT ON CONSTRAINT vapi_routes_pkey DO UPDATE
    -- A number moved to another org must not go on answering with the old org's assistant.
    SET org_id = EXCLUDED.org_id,
        assistant_id = CASE WHEN r.org_id = EXCLUDED.org_id THEN r.assistant_id END;
END
$$;
GRANT EXECUTE ON FUNCTION api.set_vapi_route(text, text, uuid) TO service_role;
