-- The change history (snaplogger): every snapd change the agent has seen,
-- kept after snapd prunes it. `body` is the change exactly as snapd rendered
-- it, tasks included, so fields this schema does not name are not lost.
CREATE TABLE changes (
    id          TEXT    PRIMARY KEY,  -- snapd's change id ("1", "2", ...)
    kind        TEXT    NOT NULL,
    summary     TEXT    NOT NULL,
    status      TEXT    NOT NULL,     -- Do, Doing, Done, Error, Undone, Hold...
    ready       INTEGER NOT NULL,     -- 0/1, as snapd says
    spawn_time  TEXT    NOT NULL,     -- RFC 3339 as snapd wrote it
    spawn_ns    INTEGER NOT NULL,     -- the same in Unix nanoseconds, for ordering
    ready_time  TEXT,
    err         TEXT,
    body        TEXT    NOT NULL,     -- JSON
    first_seen  TEXT    NOT NULL,     -- RFC 3339, when the agent first saw it
    updated     TEXT    NOT NULL      -- RFC 3339, when the agent last stored it
);
CREATE INDEX changes_by_spawn ON changes (spawn_ns);
