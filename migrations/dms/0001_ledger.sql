-- The DMS action ledger: every action the agent accepted, recorded in the
-- transaction that accepts it (before the broker hears PUBACK), so a
-- redelivered id is answered from here and never executed again, and an
-- action cut short by a restart or power cut is resolved when the agent
-- comes back.
CREATE TABLE actions (
    id               TEXT PRIMARY KEY,            -- the DMS's request id
    action           TEXT NOT NULL,
    snap             TEXT NOT NULL,
    data             TEXT NOT NULL,               -- kept to run a `received` action after a restart
    digest           TEXT NOT NULL,               -- SHA-256 of the request payload
    state            TEXT NOT NULL CHECK (state IN ('received', 'started', 'done')),
    received_ms      INTEGER NOT NULL,            -- Unix milliseconds
    updated_ms       INTEGER NOT NULL,
    response         BLOB,                        -- the reply, stored before it is published
    response_acked   INTEGER NOT NULL DEFAULT 0,  -- the broker acknowledged the reply
    change           TEXT,                        -- the snapd change the action started
    completion       BLOB,                        -- the completion report, stored before it is published
    completion_acked INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX actions_by_state ON actions (state);
CREATE INDEX actions_by_age ON actions (updated_ms);

-- The DMS link as the daemon last saw it (one row), for `iot-agent status`.
CREATE TABLE link (
    one       INTEGER PRIMARY KEY CHECK (one = 1),
    connected INTEGER NOT NULL,
    detail    TEXT,
    since_ms  INTEGER NOT NULL,
    restarts  INTEGER NOT NULL DEFAULT 0
);
