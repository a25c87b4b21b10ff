-- Refunds that failed (or were canceled) before this system debited them. Stripe does not
-- guarantee event order: refund.failed can overtake refund.created, whose object may still say
-- pending. Remembering the failure keeps the late creation from debiting a refund that failed.

CREATE TABLE billing.failed_refunds (
  refund_id   text PRIMARY KEY CHECK (length(refund_id) BETWEEN 1 AND 255),
  status      text NOT NULL CHECK (status IN ('failed', 'canceled')),
  recorded_at timestamptz NOT NULL DEFAULT now()
);
