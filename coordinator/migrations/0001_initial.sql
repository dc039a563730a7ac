-- Schema version 1 of the coordinator's PostgreSQL store (coordinator/STORE.md).
-- Public data only. Binary columns hold the same versioned encodings as the redb store.

-- Keys (store::KeyStore).
CREATE TABLE key_names (
    name   text PRIMARY KEY,
    key_id bytea NOT NULL
);
CREATE TABLE keys (
    key_id bytea PRIMARY KEY,
    public bytea NOT NULL
);
CREATE TABLE key_versions (
    name       text    NOT NULL,
    version    integer NOT NULL,
    key_id     bytea   NOT NULL,
    created_at bigint  NOT NULL,
    retired_at bigint,
    PRIMARY KEY (name, version)
);
CREATE TABLE key_profiles (
    key_id  bytea PRIMARY KEY,
    profile bytea NOT NULL
);
CREATE TABLE pending_activations (
    name    text PRIMARY KEY,
    session bytea NOT NULL,
    public  bytea NOT NULL
);
CREATE TABLE key_renewed (
    key_id bytea PRIMARY KEY,
    at     bigint NOT NULL
);
CREATE TABLE retirements (
    key_id  bytea   NOT NULL,
    node    integer NOT NULL,
    request bytea   NOT NULL,
    PRIMARY KEY (key_id, node)
);

-- Identity plane (identity::store::IdentityStore).
CREATE TABLE tasks (
    id     text PRIMARY KEY,
    record text NOT NULL
);
CREATE TABLE revoked_jti (
    jti text PRIMARY KEY,
    exp bigint NOT NULL
);
CREATE TABLE revoked_agents (
    subject text PRIMARY KEY,
    at      bigint NOT NULL
);
CREATE TABLE meta (
    name  text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE one_use (
    kind       text   NOT NULL,
    scope      text   NOT NULL,
    jti        text   NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (kind, scope, jti)
);
CREATE INDEX one_use_expires_at ON one_use (expires_at);

-- The audit chain (audit::AuditStore): one head row that every append locks.
CREATE TABLE audit_events (
    seq  bigint PRIMARY KEY,
    line text NOT NULL
);
CREATE TABLE audit_head (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    seq      bigint NOT NULL,
    hash     text   NOT NULL
);
-- The empty chain: the next event is seq 0, chained to the genesis hash.
INSERT INTO audit_head (only_row, seq, hash)
VALUES (true, -1, '0000000000000000000000000000000000000000000000000000000000000000');
