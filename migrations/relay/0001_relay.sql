-- The relay's database: what the operator set through the admin API and
-- the relay must not forget on a restart. Each write is one transaction,
-- committed before the relay acts on it (or answers).

-- Pipes (mappings): each keeps its ports and passcodes, so agents and
-- visitors find their pipes on the same ports after a restart.
CREATE TABLE pipes (
    id          TEXT PRIMARY KEY,
    type        TEXT NOT NULL CHECK (type IN ('public', 'private')),
    device      TEXT,               -- public: the device and its local target
    target      TEXT,
    max1        INTEGER NOT NULL,   -- public: maxconnections; private: port1's
    max2        INTEGER,            -- private: port2's
    threshold1  INTEGER NOT NULL,   -- milliseconds; public: heartbeatabsencethreshold
    threshold2  INTEGER,
    port1       INTEGER NOT NULL,
    port2       INTEGER NOT NULL,
    passcode1   TEXT NOT NULL,      -- secrets: the file is 0600
    passcode2   TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,   -- Unix milliseconds (the API's timestamp)
    CHECK ((type = 'public') = (device IS NOT NULL AND target IS NOT NULL)),
    CHECK ((type = 'private') = (max2 IS NOT NULL AND threshold2 IS NOT NULL))
);

-- One public pipe per device and target (the API answers 409 otherwise).
CREATE UNIQUE INDEX pipes_public ON pipes (device, target) WHERE type = 'public';

-- The accept filter: allowAll (one row, absent = false) ...
CREATE TABLE accept_filter (
    one       INTEGER PRIMARY KEY CHECK (one = 1),
    allow_all INTEGER NOT NULL CHECK (allow_all IN (0, 1))
);

-- ... or the device ids it lets in.
CREATE TABLE accept_devices (
    device_id TEXT PRIMARY KEY
);

-- Agents the relay dials and keeps connected (relay-dials).
CREATE TABLE registrations (
    device_id TEXT PRIMARY KEY,
    address   TEXT NOT NULL,       -- host:port of the agent's tunnel.listen
    tls       INTEGER NOT NULL CHECK (tls IN (0, 1))
);

-- One-time passwords for EST enrollment: only their SHA-256 is kept. Used
-- ones stay until they expire, so a replay is told "already used".
CREATE TABLE otps (
    device     TEXT NOT NULL,
    sha256     TEXT NOT NULL,      -- hex
    expires_ms INTEGER NOT NULL,
    used_ms    INTEGER,
    PRIMARY KEY (device, sha256)
);

-- JSON files of earlier relays imported into this database (`state`,
-- `registry`, `otp.state`): a file found again (its rename aside failed)
-- is not imported twice.
CREATE TABLE imports (
    source      TEXT PRIMARY KEY,  -- the config key: state, registry, otp.state
    path        TEXT NOT NULL,
    rows        INTEGER NOT NULL,
    imported_ms INTEGER NOT NULL
);
