-- Issue 29: what the share rule needs from each gateway instance's report, and how the
-- instance decides.
--
-- `active`: the instance admitted requests under this limit since its previous report;
-- only active instances take a share of a limit's headroom (an instance that serves none
-- of a subject's traffic no longer halves everyone else's share). `unit_*`: the largest
-- worst case it was asked for since then (the share rule splits the headroom into whole
-- worst cases so that the end of a budget can still be spent). `cap`: what it may admit
-- until its next refresh (the others subtract it from the headroom they share). `mode`: `exact` (through
-- the shared store), `shares` (no store configured) or `fallback` (a store is configured
-- but unreachable); the pipeline page and an alert read it. One column per statement:
-- 18.16 has no `ADD COLUMN IF NOT EXISTS`, and the runner checks `system.columns`.
ALTER TABLE limit_holds ADD COLUMN active UInt8 DEFAULT 0;
ALTER TABLE limit_holds ADD COLUMN unit_usd String DEFAULT '0';
ALTER TABLE limit_holds ADD COLUMN unit_requests UInt64 DEFAULT 0;
ALTER TABLE limit_holds ADD COLUMN unit_tokens UInt64 DEFAULT 0;
ALTER TABLE limit_holds ADD COLUMN cap String DEFAULT '0';
ALTER TABLE limit_holds ADD COLUMN mode String DEFAULT '';
