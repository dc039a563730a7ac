//! Client errors and the CLI's exit codes.
//!
//! Every message says what is wrong and what to do about it. None carries secret
//! material: errors about key files name the file, never its content, and decryption
//! failures do not echo plaintext or keys.

use std::net::SocketAddr;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, sorted by who can fix it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad arguments or input given to a command: a malformed digest, a missing input
    /// file, a key of the wrong purpose for the operation. Exit code 2.
    #[error("{0}")]
    Usage(String),
    /// Bad or missing connection settings or certificate files. Exit code 2.
    #[error("{0}")]
    Config(String),
    /// The cluster could not be reached, or did not answer in time. Exit code 3.
    #[error("cannot reach the cluster at {addr}: {detail}\n{hint}")]
    Unreachable {
        /// The coordinator address tried.
        addr: SocketAddr,
        /// What failed (TCP, TLS handshake, timeout, ...).
        detail: String,
        /// What to do about it.
        hint: String,
    },
    /// The cluster answered with an error. Exit code 4.
    #[error("the cluster refused to {op}: {message}{hint}")]
    Refused {
        /// The operation ("sign", "create the key", ...).
        op: &'static str,
        /// The gRPC status code.
        code: tonic::Code,
        /// The cluster's message.
        message: String,
        /// What to do about it (empty, or starting with a newline).
        hint: String,
    },
    /// Introspection answered that the token is not active (revoked, expired, its task
    /// ended, or not ours). Exit code 4.
    #[error("the token is not active")]
    Inactive,
    /// The request waits for a human approval (its id). Exit code 5.
    #[error("the request waits for approval {0}")]
    Pending(String),
    /// A check failed: an audit chain is broken (what and where). Exit code 4.
    #[error("{0}")]
    Failed(String),
    /// Anything else: local I/O, a malformed reply, a failed decryption. Exit code 1.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// The process exit code for this error: 2 for usage and configuration errors, 3
    /// when the cluster is unreachable, 4 when it refused the request (or a check
    /// failed), 5 when the request waits for approval, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) | Error::Config(_) => 2,
            Error::Unreachable { .. } => 3,
            Error::Refused { .. } | Error::Inactive | Error::Failed(_) => 4,
            Error::Pending(_) => 5,
            Error::Other(_) => 1,
        }
    }

    /// The gRPC status code, if the cluster refused the request.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Error::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Classifies a gRPC status returned by an `op` call to the coordinator at `addr`.
    ///
    /// `Unavailable` and `DeadlineExceeded`, and statuses tonic synthesised from a
    /// transport failure (they carry a source error; statuses sent by the server do
    /// not), mean the cluster could not be reached; every other status is a refusal.
    pub fn from_status(op: &'static str, addr: SocketAddr, status: &tonic::Status) -> Self {
        use std::error::Error as _;
        let transport = status.source().is_some()
            && matches!(status.code(), tonic::Code::Unknown | tonic::Code::Internal);
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Error::Unreachable {
                addr,
                detail: format!(
                    "{op}: {}",
                    non_empty(status.message(), "service unavailable")
                ),
                hint: unreachable_hint(status.message()),
            },
            _ if transport => {
                // tonic says only "transport error"; the reason (a TLS alert from the
                // server, a reset) is in the source chain.
                let mut detail = non_empty(status.message(), "connection lost").to_owned();
                let mut source = status.source();
                while let Some(e) = source {
                    let text = e.to_string();
                    if !detail.contains(&text) {
                        detail = format!("{detail}: {text}");
                    }
                    source = e.source();
                }
                Error::Unreachable {
                    addr,
                    hint: unreachable_hint(&detail),
                    detail: format!("{op}: {detail}"),
                }
            }
            code => Error::Refused {
                op,
                code,
                message: non_empty(status.message(), &format!("{code:?}")).to_owned(),
                hint: refused_hint(op, code, status.message()),
            },
        }
    }

    /// A failed connection attempt (TCP, TLS handshake, HTTP/2 set-up).
    pub(crate) fn connect(addr: SocketAddr, detail: String) -> Self {
        let hint = unreachable_hint(&detail);
        Error::Unreachable { addr, detail, hint }
    }

    /// No answer within `timeout`.
    pub(crate) fn timeout(
        op: &'static str,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> Self {
        Error::Unreachable {
            addr,
            detail: format!("{op}: no answer within {} s", timeout.as_secs()),
            hint: "check that the coordinator and at least t+1 fragment nodes are running \
                   (`quorate status`), or allow more time with --timeout"
                .to_owned(),
        }
    }
}

fn non_empty<'a>(s: &'a str, fallback: &'a str) -> &'a str {
    if s.trim().is_empty() { fallback } else { s }
}

/// What to do when the cluster cannot be reached: a handshake refused over a certificate
/// (an alert, an unknown issuer, a wrong name) is a certificate problem; a connection
/// that broke during the handshake is not (the coordinator stopping, restarting or
/// overloaded); anything else most likely a cluster that is not running or a wrong
/// address.
fn unreachable_hint(detail: &str) -> String {
    let d = detail.to_ascii_lowercase();
    let about_certificates = [
        "certificate",
        "alert",
        "issuer",
        "name",
        "expired",
        "signature",
    ]
    .iter()
    .any(|w| d.contains(w));
    let broke = [
        "eof",
        "reset",
        "closed",
        "broken pipe",
        "timed out",
        "timeout",
    ]
    .iter()
    .any(|w| d.contains(w));
    if d.contains("received fatal alert: handshakefailure") {
        "the coordinator ended the TLS handshake (alert HandshakeFailure): the two sides share \
         no TLS 1.3 key-exchange group or cipher suite; Quorate's API accepts only \
         X25519MLKEM768"
            .to_owned()
    } else if d.contains("received fatal alert") {
        "the coordinator refused this client's certificate during the TLS handshake (a TLS \
         alert carries no reason; the coordinator's log has it): check that --cert/--key \
         (QUORATE_CERT/QUORATE_KEY) are a client certificate issued by this cluster's CA \
         (`quorate admin init` writes client-admin.pem) and still valid"
            .to_owned()
    } else if d.contains("invalid peer certificate") {
        "this client does not trust the coordinator's certificate: check that --cacert \
         (QUORATE_CACERT) is this cluster's CA and that --domain (QUORATE_DOMAIN) matches \
         the cluster's trust domain"
            .to_owned()
    } else if d.contains("tls handshake") && broke && !about_certificates {
        "the connection broke during the TLS handshake, before any certificate was refused: \
         the coordinator may be stopping, restarting or overloaded; retry, and read its log if \
         this persists"
            .to_owned()
    } else if d.contains("tls handshake") || about_certificates {
        "the TLS handshake failed: check that --cacert (QUORATE_CACERT) is this cluster's CA, \
         that --cert/--key (QUORATE_CERT/QUORATE_KEY) are a client certificate issued by it \
         (`quorate admin init` writes client-admin.pem), and that --domain (QUORATE_DOMAIN) \
         matches the cluster's trust domain"
            .to_owned()
    } else {
        "is `quorate dev` (or the coordinator) running? For a dev cluster, `source DIR/env` \
         (default DIR: ./quorate-dev) to set QUORATE_ADDR; otherwise pass --addr HOST:PORT"
            .to_owned()
    }
}

/// Operations of the identity API: their refusals come from policy or attestation checks,
/// not from the caller's certificate.
const IDENTITY_OPS: [&str; 7] = [
    "issue a token",
    "exchange the token",
    "revoke",
    "start the task",
    "end the task",
    "apply the policy",
    "introspect the token",
];

fn refused_hint(op: &str, code: tonic::Code, message: &str) -> String {
    let identity = IDENTITY_OPS.contains(&op);
    let hint = match code {
        _ if identity && message.contains("DPoP") => {
            "a DPoP-bound token needs a fresh proof by the key it is bound to (its cnf.jkt): pass \
             the same --dpop-key it was issued with (`quorate dpop thumbprint FILE` shows a \
             key's thumbprint)"
        }
        tonic::Code::Unauthenticated if identity && message.contains("X.509-SVID") => {
            "the X.509-SVID was refused: it must chain to an `svid` trust bundle in the \
             coordinator's --trust-config, outside the cluster's own trust domain, and be valid \
             now (`quorate dev svid` issues one for a dev cluster started with --agent-listen)"
        }
        tonic::Code::Unauthenticated if identity => {
            "the agent's attestation was refused: it must come from an issuer in the coordinator's \
             --trust-config, for its audience, and be within its validity (`quorate dev attest` \
             makes a fresh one for a dev cluster)"
        }
        tonic::Code::PermissionDenied if identity => {
            "the cluster's Cedar policy (or a revocation) decided this: `quorate policy show` \
             names the active set"
        }
        tonic::Code::PermissionDenied
            if op == "decide the approval" || op == "apply the policy bundle" =>
        {
            "the message says why: under an operator-signed policy bundle an approval needs \
             --approver-key, and a bundle needs --operator-key; the fragment nodes verify both"
        }
        tonic::Code::PermissionDenied if op == "sign" || op == "create the key" => {
            "a key's profile or a fragment node's ceiling refused this (the message says which), \
             or this client may not do it: `quorate key list` shows each key's profile"
        }
        tonic::Code::NotFound => "list the cluster's keys with `quorate key list`",
        tonic::Code::AlreadyExists => "choose another name, or use the existing key",
        // The coordinator could not tell who the caller is: a certificate matter.
        tonic::Code::Unauthenticated => {
            "use a client certificate this cluster accepts (--cert/--key, QUORATE_CERT/QUORATE_KEY)"
        }
        // It knew the caller and its policy said no: not a certificate matter.
        tonic::Code::PermissionDenied => {
            "the cluster's policy refused this client (the message names what decided it); `quorate policy show` lists the active policy set"
        }
        tonic::Code::ResourceExhausted => "retry shortly, or send less data (e.g. `--digest`)",
        tonic::Code::FailedPrecondition => {
            "check the key's profile (`quorate key list`) and the cluster's health (`quorate status`)"
        }
        tonic::Code::Unimplemented => {
            "the coordinator does not offer this operation: check that client and cluster versions match"
        }
        tonic::Code::Internal | tonic::Code::Unknown | tonic::Code::DataLoss => {
            "this is a cluster-side failure: check the coordinator's log"
        }
        _ => "",
    };
    if hint.is_empty() {
        String::new()
    } else {
        format!("\n{hint}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:7100".parse().unwrap()
    }

    #[test]
    fn statuses_map_to_exit_codes() {
        let e = Error::from_status("sign", addr(), &tonic::Status::unavailable("down"));
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("127.0.0.1:7100"), "{e}");
        let e = Error::from_status("sign", addr(), &tonic::Status::deadline_exceeded("slow"));
        assert_eq!(e.exit_code(), 3);
        let e = Error::from_status("sign", addr(), &tonic::Status::not_found("no key `x`"));
        assert_eq!(e.exit_code(), 4);
        assert_eq!(e.code(), Some(tonic::Code::NotFound));
        let text = e.to_string();
        assert!(
            text.contains("no key `x`") && text.contains("quorate key list"),
            "{text}"
        );
        let e = Error::from_status("sign", addr(), &tonic::Status::invalid_argument("bad"));
        assert_eq!(e.exit_code(), 4);
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        assert_eq!(Error::Config("x".into()).exit_code(), 2);
        assert_eq!(Error::Other("x".into()).exit_code(), 1);
    }

    #[test]
    fn only_an_unknown_caller_is_pointed_at_certificates() {
        let denied = Error::from_status(
            "list approvals",
            addr(),
            &tonic::Status::permission_denied("policy forbids Client::\"ci\" list_approvals"),
        )
        .to_string();
        assert!(!denied.contains("--cert"), "{denied}");
        assert!(denied.contains("policy"), "{denied}");
        let unknown = Error::from_status(
            "list approvals",
            addr(),
            &tonic::Status::unauthenticated("no client certificate"),
        )
        .to_string();
        assert!(unknown.contains("--cert"), "{unknown}");
    }

    #[test]
    fn handshake_failures_point_at_certificates() {
        let e = Error::connect(
            addr(),
            "TLS handshake with coordinator failed: bad cert".into(),
        );
        assert!(e.to_string().contains("--cacert"), "{e}");
        let e = Error::connect(addr(), "Connection refused".into());
        assert!(e.to_string().contains("quorate dev"), "{e}");
        // A coordinator that dies mid-handshake is not a certificate problem.
        let e = Error::connect(
            addr(),
            "TLS handshake with coordinator at 127.0.0.1:7100 failed: peer closed connection without sending TLS close_notify (unexpected EOF)".into(),
        );
        assert!(!e.to_string().contains("--cacert"), "{e}");
        assert!(e.to_string().contains("restarting"), "{e}");
        // The coordinator refused our certificate: a client certificate matter.
        let e = Error::connect(
            addr(),
            "TLS handshake with coordinator failed: received fatal alert: UnknownCA".into(),
        );
        assert!(
            e.to_string().contains("refused this client's certificate"),
            "{e}"
        );
        assert!(e.to_string().contains("--cert/--key"), "{e}");
        // We refused the coordinator's: the CA or the domain.
        let e = Error::connect(
            addr(),
            "TLS handshake with coordinator failed: invalid peer certificate: UnknownIssuer".into(),
        );
        assert!(e.to_string().contains("--cacert"), "{e}");
        assert!(!e.to_string().contains("--cert/--key"), "{e}");
        let e = Error::connect(
            addr(),
            "TLS handshake failed: received fatal alert: HandshakeFailure".into(),
        );
        assert!(e.to_string().contains("X25519MLKEM768"), "{e}");
    }

    /// tonic reports a connection the server broke off as "transport error"; the reason
    /// (here a TLS alert after the handshake, as TLS 1.3 sends a client-certificate
    /// refusal) is in its source chain, and must reach the user.
    #[test]
    fn a_transport_error_carries_its_source() {
        #[derive(Debug)]
        struct Wrapped(std::io::Error);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection error")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let inner = Wrapped(std::io::Error::other(
            "received fatal alert: BadCertificate",
        ));
        let status = tonic::Status::from_error(Box::new(inner));
        let e = Error::from_status("issue a token", addr(), &status);
        assert_eq!(e.exit_code(), 3, "{e}");
        let text = e.to_string();
        assert!(text.contains("BadCertificate"), "{text}");
        assert!(text.contains("refused this client's certificate"), "{text}");
    }
}
