-- Every statement the shim sends, each under a `-- name: <name>` line (procrastinate keeps its
-- queries the same way). Each is one call into the api schema.

-- name: ingest_webhook
-- Store a verified provider event and apply it, in one transaction. The payload is JSON text
-- and the outcome comes back as JSON text: the shim relays both without re-encoding them.
SELECT api.ingest_webhook(%(provider)s::text, %(event_id)s::text, %(event_type)s::text, %(payload)s::jsonb)::text AS outcome

-- name: become_user
-- Act as the signed-in user for the rest of the transaction, the way PostgREST does.
SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', %(claims)s::text, true)

-- name: begin_checkout
-- Decide, as the user, whether a Checkout Session exists for this request or may be created.
SELECT api.begin_checkout(%(amount_minor)s::bigint, %(client_request_id)s::uuid) AS answer

-- name: record_checkout_session
-- Record the session Stripe created for a request.
SELECT api.record_checkout_session(%(request_id)s::bigint, %(session_id)s::text, %(checkout_url)s::text, to_timestamp(%(expires_at)s::bigint)) AS answer

-- name: release_checkout_lease
-- Stripe could not create the session: let the retry take the lease at once.
SELECT api.release_checkout_lease(%(request_id)s::bigint)

-- name: mark_checkout_expired
-- Stripe says the request's session expired unpaid: the next begin_checkout starts a new attempt.
SELECT api.mark_checkout_expired(%(request_id)s::bigint, %(session_id)s::text)

-- name: retry_webhook_events
-- The worker's pass over failed events that are due.
SELECT api.retry_webhook_events(%(max_events)s::integer) AS counts

-- name: expire_holds
-- Free holds of calls and SMS that were never reported.
SELECT api.expire_holds() AS expired

-- name: lease_recharge_claims
-- Pending auto-recharge claims for the worker to charge.
SELECT * FROM api.lease_recharge_claims(%(max_claims)s::integer)

-- name: record_recharge_result
-- What Stripe answered for a claim's PaymentIntent.
SELECT * FROM api.record_recharge_result(%(claim_id)s::bigint, %(outcome)s::text, %(payment_intent_id)s::text, %(amount_minor)s::bigint, %(currency)s::text, %(failure_code)s::text)

-- name: mark_recharge_processing
-- Stripe accepted a claim's PaymentIntent but has not settled it: never create it again.
SELECT api.mark_recharge_processing(%(claim_id)s::bigint, %(payment_intent_id)s::text) AS claim

-- name: schema_current
-- Whether every migration in this release has been applied (for /healthz).
SELECT count(*) AS applied FROM public._yoyo_migration WHERE migration_id = ANY(%(ids)s::text[])

-- name: reconciliation_due
-- Whether a provider's scheduled reconciliation is due, and its lookback.
SELECT api.reconciliation_due(%(provider)s::text) AS due

-- name: failed_reconciliation_window
-- The window of a provider's latest failed reconciliation run (null when none).
SELECT api.failed_reconciliation_window(%(provider)s::text) AS window

-- name: health_report
-- Every billing health number and the alerts evaluated on them, from one evaluation.
SELECT api.health_report() AS report

-- name: twilio_reconciliation_candidates
-- The SMS a Twilio reconciliation run asks Twilio about: callback overdue or never came.
SELECT message_sid FROM api.twilio_reconciliation_candidates(%(run_id)s::bigint) AS message_sid

-- name: reconcile_twilio_message
-- Apply the status Twilio reports for one SMS through the status callback's path.
SELECT api.reconcile_twilio_message(%(run_id)s::bigint, %(message_sid)s::text, %(message)s::jsonb) AS result

-- name: lease_call_ends
-- Calls to end now through their control URL, each leased to this sender.
SELECT call_id, control_url, reason, attempts FROM api.lease_call_ends(%(max_calls)s::integer, %(only_call_id)s::text)

-- name: record_call_end
-- What one end-call request answered.
SELECT api.record_call_end(%(call_id)s::text, %(ended)s::boolean, %(error)s::text) AS state

-- name: admit_call
-- Admit an outbound call under a provisional id before Vapi creates it.
SELECT (api.admit_call(%(org_id)s::uuid, %(call_id)s::text, %(max_minutes)s::integer)).*

-- name: bind_call
-- Re-key the admission's hold to the call id Vapi returned.
SELECT (api.bind_call(%(org_id)s::uuid, %(admission_id)s::text, %(call_id)s::text)).*

-- name: release_call
-- Vapi refused to create the call: free its admission.
SELECT (api.release_call(%(org_id)s::uuid, %(call_id)s::text)).*
