-- api.lease_recharge_claims now also returns each claim's created_at (the worker looks for a
-- PaymentIntent an earlier attempt created since then). A function's result type cannot be
-- changed by CREATE OR REPLACE: the old one is dropped here, db/functions/40_recharge.sql
-- creates the new one right after the migrations.
DROP FUNCTION IF EXISTS api.lease_recharge_claims(integer);
