-- Every Stripe customer a recharge claim was sent under (issue 13, item 2). A retried claim looks
-- for the PaymentIntent an earlier attempt created under each of them: when the wallet's customer
-- changed between attempts and Stripe had pruned the claim's idempotency key, the lookup under
-- the current customer alone found nothing and the claim charged a second card.
ALTER TABLE billing.recharge_claims
  ADD COLUMN sent_to_customers text[] NOT NULL DEFAULT '{}';

-- api.lease_recharge_claims returns the list: its result type changes (db/functions/40_recharge.sql
-- creates the new one right after the migrations).
DROP FUNCTION IF EXISTS api.lease_recharge_claims(integer);
