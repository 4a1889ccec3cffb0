-- The ids (nonces) of signed actions, kept until their signature has
-- expired (plus the skew allowance): a replay is refused as a replay while
-- the signature would still verify, even after the action's own row was
-- pruned (by count, `dms.ledger.max.count`), and as expired after that.
CREATE TABLE signed_nonces (
    id          TEXT PRIMARY KEY,   -- the action id, the signature's nonce
    kid         TEXT NOT NULL,      -- the key that signed it
    expires_s   INTEGER NOT NULL,   -- exp + skew, Unix seconds
    received_ms INTEGER NOT NULL
);

CREATE INDEX signed_nonces_by_expiry ON signed_nonces (expires_s);
