-- The export spool (export.spool.path): messages waiting for the upstream.
-- Applied by src/export/schema.rs, recorded in PRAGMA user_version.

-- One row per message. `seq` is AUTOINCREMENT so a number is never reused,
-- even after the newest rows were deleted: it orders messages (per stream
-- and overall) and, with the spool id, names a message upstream.
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    stream      TEXT    NOT NULL,
    received_ms INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    payload     BLOB    NOT NULL
);

-- Running totals, updated in the same transaction as every insert and
-- delete, so the bounds are checked without scanning the table.
CREATE TABLE totals (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    messages INTEGER NOT NULL,
    bytes    INTEGER NOT NULL
);
INSERT INTO totals (id, messages, bytes) VALUES (1, 0, 0);

-- Monotonic counters (received, forwarded, dropped, refused, expired...).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- Facts about this spool: its random id (the prefix of upstream message
-- ids), the highest seq ever handed to the upstream, the daemon's status.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (key, value) VALUES ('spool-id', lower(hex(randomblob(8))));
INSERT INTO meta (key, value) VALUES ('sent-through', '0');
