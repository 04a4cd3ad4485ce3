-- Issue 36, item 3: a key paused by the spend-spike brake (`on_spike = "suspend_key"`):
-- `held` names the alert that paused it; empty: not held. The gateway refuses a held key
-- (saying why and how to get it back) until the alert is acknowledged, which clears it.
ALTER TABLE proxy_keys ADD COLUMN held String DEFAULT '';
