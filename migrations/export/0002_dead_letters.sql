-- Messages the upstream refused for good (too large for it, a permanent
-- JetStream error): moved aside so the rest of the spool flows in order.
-- Kept for an operator to inspect (`iot-agent export status`); not resent.
CREATE TABLE dead_letters (
    seq         INTEGER PRIMARY KEY,
    stream      TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    failed_ms   INTEGER NOT NULL,
    error       TEXT    NOT NULL
);
