-- Retry-safe issuance (IssueTokenRequest.request_id): a one-use jti remembers the
-- request that used it, so that the same request retried (on any coordinator) is
-- accepted and any other use is refused.
ALTER TABLE one_use ADD COLUMN owner text NOT NULL DEFAULT '';

-- One row per retry-safe request: the request's digest, the claims chosen for it and
-- the answer given, so that every retry gets the same token.
CREATE TABLE issuance (
    key        text   PRIMARY KEY,
    digest     text   NOT NULL,
    claims     text,
    reply      text,
    expires_at bigint NOT NULL
);
CREATE INDEX issuance_expires_at ON issuance (expires_at);

-- Approval requests (identity::approval), shared by every coordinator: the record is
-- the entry as JSON; state and expiry are columns for the sweep.
CREATE TABLE approvals (
    id         text   PRIMARY KEY,
    state      text   NOT NULL,
    expires_at bigint NOT NULL,
    record     text   NOT NULL
);
CREATE INDEX approvals_pending ON approvals (expires_at) WHERE state = 'pending';
