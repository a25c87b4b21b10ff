-- Top-ups through Stripe Checkout: one SQL call decides whether a session exists or may be
-- created, so that a double click, a retry and two tabs produce one session.

-- The answer of begin_checkout / record_checkout_session for one request row.
CREATE OR REPLACE FUNCTION billing._checkout_answer(c billing.checkout_requests, p_status text)
  RETURNS jsonb
  LANGUAGE sql IMMUTABLE SECURITY INVOKER SET search_path = ''
AS $$
  SELECT pg_catalog.jsonb_build_object(
    'status', p_status, 'request_id', c.id, 'org_id', c.org_id,
    'client_request_id', c.client_request_id, 'amount_minor', c.amount_minor,
    'currency', c.currency, 'idempotency_key', c.idempotency_key,
    'session_id', c.session_id, 'checkout_url', c.checkout_url)
$$;

-- Called by the platform frontend's user (through the shim, under the user's JWT).
-- status: 'existing' (return this session), 'create' (you hold the lease: call Stripe with
-- idempotency_key, then record_checkout_session), 'pending' (another request holds the lease:
-- ask again shortly), 'conflict' (this client_request_id was used for another amount), 'verify'
-- (the session's expiry has passed with no payment seen: ask Stripe; if it says expired, call
-- api.mark_checkout_expired and ask again, else the same session stands).
-- SECURITY DEFINER on purpose, the body being the guard (the org from the JWT only, every query
-- filtered on it): README, "Why two client functions are SECURITY DEFINER".
CREATE OR REPLACE FUNCTION api.begin_checkout(amount_minor bigint, client_request_id uuid)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  v_org uuid := billing._require_caller_org();
  s billing.settings := billing._settings();
  w billing.wallets;
  c billing.checkout_requests;
BEGIN
  IF coalesce(billing._caller_org_role(), '') NOT IN ('owner', 'admin', 'member') THEN
    RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = 'caller is not a member of the organisation';
  END IF;
  IF client_request_id IS NULL THEN
    PERFORM billing._invalid('client_request_id', 'must not be null');
  END IF;
  IF amount_minor IS NULL OR amount_minor NOT BETWEEN s.min_top_up_minor AND s.max_top_up_minor THEN
    PERFORM billing._invalid('amount_minor',
      pg_catalog.format('must be between %s and %s', s.min_top_up_minor, s.max_top_up_minor));
  END IF;

  -- Serialise this org's checkout decisions on its wallet row.
  w := billing._lock_wallet(v_org);
  IF w.org_id IS NULL THEN
    RAISE EXCEPTION USING ERRCODE = 'P0002', MESSAGE = 'no wallet for the caller''s organisation';
  END IF;

  -- This request id: its own row, or the row it was answered with from another tab.
  SELECT cr.* INTO c FROM billing.checkout_requests AS cr
   WHERE cr.org_id = v_org AND cr.client_request_id = begin_checkout.client_request_id
  UNION ALL
  SELECT cr.* FROM billing.checkout_aliases AS a
    JOIN billing.checkout_requests AS cr ON cr.id = a.request_id
   WHERE a.org_id = v_org AND a.client_request_id = begin_checkout.client_request_id
  LIMIT 1;
  IF FOUND AND c.amount_minor <> begin_checkout.amount_minor THEN
    RETURN billing._checkout_answer(c, 'conflict');
  END IF;
  IF NOT FOUND THEN
    -- Another tab asking for the same amount moments ago gets that session too.
    SELECT * INTO c FROM billing.checkout_requests AS cr
     WHERE cr.org_id = v_org AND cr.amount_minor = begin_checkout.amount_minor
       AND cr.status IN ('creating', 'open')
       AND cr.created_at > now() - s.checkout_dedupe_window
     ORDER BY cr.created_at DESC LIMIT 1;
    IF FOUND THEN
      INSERT INTO billing.checkout_aliases (org_id, client_request_id, request_id)
      VALUES (v_org, begin_checkout.client_request_id, c.id);
    END IF;
  END IF;
  IF c.id IS NULL THEN
    INSERT INTO billing.checkout_requests AS cr (
      org_id, client_request_id, amount_minor, currency, status, idempotency_key, lease_until,
      requested_by)
    VALUES (v_org, begin_checkout.client_request_id, begin_checkout.amount_minor, w.currency,
            'creating',
            pg_catalog.format('creditledger-checkout-%s-%s-1', v_org, begin_checkout.client_request_id),
            now() + s.checkout_lease, auth.uid())
    RETURNING * INTO c;
    RETURN billing._checkout_answer(c, 'create');
  END IF;

  -- A paid request is never offered, nor created, again.
  IF c.status = 'completed' OR (c.status = 'open' AND coalesce(c.session_expires_at > now(), true)) THEN
    RETURN billing._checkout_answer(c, 'existing');
  ELSIF c.status = 'open' THEN
    -- Expired by our clock, but the customer may have paid at the last moment and its webhook
    -- not arrived yet: only Stripe can say that a new attempt cannot make them pay twice (F-9).
    RETURN billing._checkout_answer(c, 'verify');
  ELSIF c.status = 'creating' AND c.lease_until > now() THEN
    RETURN billing._checkout_answer(c, 'pending');
  ELSIF c.status = 'creating' THEN
    -- The lease holder died: take over with the same key, so Stripe replays its session if the
    -- first creation got through.
    UPDATE billing.checkout_requests SET lease_until = now() + s.checkout_lease, updated_at = now()
     WHERE id = c.id RETURNING * INTO c;
    RETURN billing._checkout_answer(c, 'create');
  END IF;
  -- Stripe said the session expired unpaid: a new attempt, under a new key.
  UPDATE billing.checkout_requests AS cr
     SET status = 'creating', attempt = cr.attempt + 1, session_id = NULL, checkout_url = NULL,
         session_expires_at = NULL, lease_until = now() + s.checkout_lease, updated_at = now(),
         idempotency_key = pg_catalog.format('creditledger-checkout-%s-%s-%s', cr.org_id,
                                             cr.client_request_id, cr.attempt + 1)
   WHERE cr.id = c.id RETURNING * INTO c;
  RETURN billing._checkout_answer(c, 'create');
END
$$;
GRANT EXECUTE ON FUNCTION api.begin_checkout(bigint, uuid) TO authenticated;

-- The shim records the session Stripe created for a request it held the lease of.
CREATE OR REPLACE FUNCTION api.record_checkout_session(
  request_id bigint, session_id text, checkout_url text, expires_at timestamptz DEFAULT NULL)
  RETURNS jsonb
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
DECLARE
  c billing.checkout_requests;
BEGIN
  PERFORM billing._check_key('session_id', session_id);
  IF checkout_url IS NULL OR checkout_url = '' THEN
    PERFORM billing._invalid('checkout_url', 'must not be empty');
  END IF;
  UPDATE billing.checkout_requests AS cr
     SET status = 'open', session_id = record_checkout_session.session_id,
         checkout_url = record_checkout_session.checkout_url,
         session_expires_at = record_checkout_session.expires_at, lease_until = NULL,
         updated_at = now()
   WHERE cr.id = request_id AND cr.status = 'creating'
  RETURNING * INTO c;
  IF NOT FOUND THEN
    SELECT * INTO c FROM billing.checkout_requests AS cr WHERE cr.id = request_id;
    IF NOT FOUND THEN
      PERFORM billing._invalid('request_id', 'no such checkout request');
    END IF;
  END IF;
  RETURN billing._checkout_answer(c, 'existing');
END
$$;
GRANT EXECUTE ON FUNCTION api.record_checkout_session(bigint, text, text, timestamptz) TO service_role;

-- Stripe says the request's session expired unpaid: the next api.begin_checkout for it starts a
-- new attempt. Only that session of an open request is marked (a second tab's check changes
-- nothing once the first has moved on).
CREATE OR REPLACE FUNCTION api.mark_checkout_expired(request_id bigint, session_id text)
  RETURNS void
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
  UPDATE billing.checkout_requests AS cr SET status = 'expired', updated_at = now()
   WHERE cr.id = mark_checkout_expired.request_id AND cr.session_id = mark_checkout_expired.session_id
     AND cr.status = 'open'
$$;
GRANT EXECUTE ON FUNCTION api.mark_checkout_expired(bigint, text) TO service_role;

-- The lease holder could not create the session (Stripe unreachable): give the lease back so the
-- customer's retry proceeds at once, under the same idempotency key.
CREATE OR REPLACE FUNCTION api.release_checkout_lease(request_id bigint)
  RETURNS void
  LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = ''
AS $$
  UPDATE billing.checkout_requests AS cr SET lease_until = now(), updated_at = now()
   WHERE cr.id = release_checkout_lease.request_id AND cr.status = 'creating'
$$;
GRANT EXECUTE ON FUNCTION api.release_checkout_lease(bigint) TO service_role;
