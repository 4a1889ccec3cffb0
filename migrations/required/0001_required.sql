-- Per-serial required-install requests, kept until they are done so a
-- restart or reboot in the middle resumes them.
CREATE TABLE requirements (
    id           TEXT PRIMARY KEY,          -- the DMS's request id
    received     TEXT NOT NULL,             -- RFC 3339
    topic        TEXT NOT NULL,             -- where the request came from (MQTT form)
    state        TEXT NOT NULL,             -- 'pending' | 'done'
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt INTEGER NOT NULL DEFAULT 0, -- unix seconds
    result       TEXT                       -- the result message, once done
);

CREATE TABLE required_snaps (
    requirement TEXT NOT NULL REFERENCES requirements(id) ON DELETE CASCADE,
    position    INTEGER NOT NULL,
    name        TEXT NOT NULL,
    channel     TEXT NOT NULL,
    status      TEXT NOT NULL,              -- pending | installed | already-installed | switched | failed
    change      TEXT,                       -- the snapd change working on it
    error       TEXT,
    PRIMARY KEY (requirement, name)
);
