-- Twilio joins the reconciled providers: a run fetches the Message resource of every SMS whose
-- status callback is overdue or never came, and applies its status through the callback's path.

ALTER TABLE billing.reconciliation_runs DROP CONSTRAINT reconciliation_runs_provider_check;
ALTER TABLE billing.reconciliation_runs ADD CONSTRAINT reconciliation_runs_provider_check
  CHECK (provider IN ('stripe', 'vapi', 'twilio'));

-- How far back a scheduled Twilio run looks (by when the SMS was registered), and how long an SMS
-- hold waits for its callback before a run asks Twilio (callbacks normally arrive in seconds).
ALTER TABLE billing.settings
  ADD COLUMN reconcile_twilio_lookback interval NOT NULL DEFAULT interval '7 days',
  ADD COLUMN reconcile_sms_grace interval NOT NULL DEFAULT interval '15 minutes';
