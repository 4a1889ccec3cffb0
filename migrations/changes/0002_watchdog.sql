-- The watchdog's memory: the changes that already caused a reboot. A change
-- listed here never causes another one, across reboots and agent upgrades.
CREATE TABLE watchdog_reboots (
    change_id    TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    summary      TEXT NOT NULL,
    spawn_time   TEXT NOT NULL,
    triggered_at TEXT NOT NULL,   -- RFC 3339
    report       TEXT NOT NULL    -- path of the snap_changes_{X}.json written
);
-- Listing by status (`iot-agent changes --status Error`) on a full history.
CREATE INDEX changes_by_status ON changes (status);
