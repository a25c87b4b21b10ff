-- A reconciliation run killed hard (SIGKILL, a lost machine) stayed 'running' forever (F-13).
-- Each counted object now stamps the run's progress; a run that has made none for
-- reconcile_stall is failed by the next start for its provider, so it can be resumed.

ALTER TABLE billing.reconciliation_runs
  ADD COLUMN progressed_at timestamptz NOT NULL DEFAULT now();

ALTER TABLE billing.settings
  ADD COLUMN reconcile_stall interval NOT NULL DEFAULT interval '15 minutes';
