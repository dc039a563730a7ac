//! Failing over between the coordinators of one cluster.
//!
//! A cluster may run several coordinators over one store (`coordinator/STORE.md`). The
//! client keeps one channel per coordinator (the first reachable one is connected by
//! [`super::Client::connect`], the others on first use), sends every call to the
//! coordinator that answered last, and retries a call that failed in a retryable way on
//! the next one, with a short jittered backoff after each full round, all within the
//! call's timeout.
//!
//! Which calls are retried ([`Retry`]):
//!
//! - [`Retry::Idempotent`]: reads (status, keys, public keys, policy, approvals, audit,
//!   introspection, health), `sign`/`derive`/`decrypt`/credentials (a retried sign may
//!   use a second presignature for the same digest, which is safe: a presignature never
//!   signs two messages, DESIGN.md §4.5, and each coordinator has its own pools),
//!   `issue_token`/`exchange_token` (every attempt carries the same `request_id`, so the
//!   coordinators answer a retry with the same token), revoke and end task (the same
//!   outcome however often they are done). These are retried after a transport failure
//!   (the connection dropped, the stream was reset), `UNAVAILABLE`, or a failure to
//!   connect.
//! - [`Retry::Unsent`]: calls that create something (create, rotate or refresh a key,
//!   repair a node, start a task, apply a policy, decide an approval). They are retried
//!   only when the failure proves the request never reached a coordinator: the TCP
//!   connection was refused or the TLS handshake never completed.
//!
//! Never retried: any status a coordinator decided (`PERMISSION_DENIED`,
//! `INVALID_ARGUMENT`, `NOT_FOUND`, ...), `DEADLINE_EXCEEDED` (the budget is spent), and
//! a refused certificate (every coordinator would refuse it alike).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use quorate_proto::tls::{Role, TlsError};
use quorate_proto::transport;
use tokio::sync::OnceCell;
use tonic::transport::Channel;

use crate::error::Error;

/// Upper bound for connecting to one coordinator (TCP, TLS handshake, HTTP/2 set-up).
const CONNECT_LIMIT: Duration = Duration::from_secs(30);

/// Full rounds over every coordinator before a retryable failure is returned.
const ROUNDS: usize = 3;

/// Backoff after the first full round; doubles after each further one.
const BACKOFF: Duration = Duration::from_millis(50);

/// When a failed call may be sent again, to the next coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Safe to repeat: retried after any retryable failure ([`Failure::Retryable`]).
    Idempotent,
    /// Creates something: retried only if it never reached a coordinator
    /// ([`Failure::Unsent`]).
    Unsent,
}

/// How a failed attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The request provably never reached a coordinator: connection refused, or the
    /// TLS handshake broke off before completing.
    Unsent,
    /// The coordinator was lost or unavailable; it may or may not have acted.
    Retryable,
    /// The coordinator decided, or retrying cannot help.
    Final,
}

impl Failure {
    /// Whether a call with `retry` may be sent again after this failure.
    pub(crate) fn allows(self, retry: Retry) -> bool {
        match (self, retry) {
            (Failure::Unsent, _) => true,
            (Failure::Retryable, Retry::Idempotent) => true,
            (Failure::Retryable, Retry::Unsent) | (Failure::Final, _) => false,
        }
    }
}

/// Classifies a failed call's status.
///
/// A status tonic made from a transport failure carries the failure as its source; one
/// a coordinator sent does not. A connection refused or a handshake that broke off
/// (our connector's error, "TLS handshake with ... failed") is [`Failure::Unsent`],
/// unless a certificate was refused (every coordinator would refuse it: final).
pub(crate) fn classify(status: &tonic::Status) -> Failure {
    use std::error::Error as _;
    let mut chain = String::new();
    let mut refused = false;
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            refused |= io.kind() == std::io::ErrorKind::ConnectionRefused;
        }
        chain.push_str(&e.to_string());
        chain.push('\n');
        source = e.source();
    }
    let text = chain.to_ascii_lowercase();
    let transport = status.source().is_some();
    if transport && certificate_refused(&text) {
        return Failure::Final;
    }
    if transport && (refused || text.contains("connection refused")) {
        return Failure::Unsent;
    }
    if transport && text.contains("tls handshake with") {
        return Failure::Unsent;
    }
    match status.code() {
        tonic::Code::Unavailable => Failure::Retryable,
        // A reset stream or a dropped connection, as tonic reports it.
        tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled if transport => {
            Failure::Retryable
        }
        _ => Failure::Final,
    }
}

/// Classifies a failed connection attempt's reason (from [`transport::connect`]).
pub(crate) fn classify_connect(reason: &str) -> Failure {
    if certificate_refused(&reason.to_ascii_lowercase()) {
        Failure::Final
    } else {
        Failure::Unsent
    }
}

fn certificate_refused(text: &str) -> bool {
    text.contains("received fatal alert") || text.contains("invalid peer certificate")
}

/// One coordinator: its address and, once connected, its channel (which reconnects by
/// itself when the connection drops).
struct Endpoint {
    addr: SocketAddr,
    channel: OnceCell<Channel>,
}

/// Every coordinator of the cluster, and which one to send to first.
pub(crate) struct Endpoints {
    list: Vec<Endpoint>,
    preferred: AtomicUsize,
    retries: AtomicU64,
    tls: Arc<rustls::ClientConfig>,
    domain: String,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field(
                "addrs",
                &self.list.iter().map(|e| e.addr).collect::<Vec<_>>(),
            )
            .field("preferred", &self.preferred())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// A failed connection attempt.
pub(crate) struct ConnectFailure {
    pub(crate) reason: String,
    pub(crate) failure: Failure,
}

impl Endpoints {
    /// The coordinators at `addrs` (at least one; duplicates dropped), none connected.
    pub(crate) fn new(addrs: &[SocketAddr], tls: Arc<rustls::ClientConfig>, domain: &str) -> Self {
        let mut list: Vec<Endpoint> = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            if !list.iter().any(|e| e.addr == addr) {
                list.push(Endpoint {
                    addr,
                    channel: OnceCell::new(),
                });
            }
        }
        Endpoints {
            list,
            preferred: AtomicUsize::new(0),
            retries: AtomicU64::new(0),
            tls,
            domain: domain.to_owned(),
        }
    }

    /// How many coordinators there are.
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    /// The index of the coordinator to send to first.
    pub(crate) fn preferred(&self) -> usize {
        self.preferred.load(Ordering::Relaxed) % self.list.len().max(1)
    }

    /// Sends to coordinator `i` first from now on.
    pub(crate) fn prefer(&self, i: usize) {
        self.preferred.store(i, Ordering::Relaxed);
    }

    /// Counts one call sent again after a failure.
    pub(crate) fn count_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// How many times calls were sent again after a failure.
    pub(crate) fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Coordinator `i`'s address (`i` taken modulo the count).
    pub(crate) fn addr(&self, i: usize) -> Option<SocketAddr> {
        self.list.get(i % self.list.len().max(1)).map(|e| e.addr)
    }

    /// Coordinator `i`'s channel, connecting it first (within `limit`) if it never was.
    pub(crate) async fn channel(
        &self,
        i: usize,
        limit: Duration,
    ) -> Result<Channel, ConnectFailure> {
        let Some(endpoint) = self.list.get(i % self.list.len().max(1)) else {
            return Err(ConnectFailure {
                reason: "no coordinator address".to_owned(),
                failure: Failure::Final,
            });
        };
        let limit = limit.min(CONNECT_LIMIT);
        endpoint
            .channel
            .get_or_try_init(|| async {
                let connecting = transport::connect(
                    endpoint.addr,
                    &Role::Coordinator,
                    &self.domain,
                    Arc::clone(&self.tls),
                );
                match tokio::time::timeout(limit, connecting).await {
                    Err(_elapsed) => Err(ConnectFailure {
                        reason: format!("no connection within {} ms", limit.as_millis()),
                        failure: Failure::Unsent,
                    }),
                    Ok(Err(TlsError::Connect { reason, .. })) => Err(ConnectFailure {
                        failure: classify_connect(&reason),
                        reason,
                    }),
                    Ok(Err(other)) => Err(ConnectFailure {
                        reason: other.to_string(),
                        failure: Failure::Final,
                    }),
                    Ok(Ok(channel)) => {
                        tracing::debug!(addr = %endpoint.addr, "connected to the coordinator");
                        Ok(channel)
                    }
                }
            })
            .await
            .cloned()
    }
}

/// The pause before attempt `attempt` (0-based) of a call to `n` coordinators: none
/// within the first round (the next coordinator is another process), then
/// [`BACKOFF`] doubling per round, each scaled by a random factor in [0.5, 1.0).
pub(crate) fn backoff(attempt: usize, n: usize, jitter: u64) -> Duration {
    let round = attempt / n.max(1);
    if round == 0 {
        return Duration::ZERO;
    }
    let base = BACKOFF.saturating_mul(1 << (round - 1).min(6));
    // 0.5 + (jitter mod 1000)/2000: in [0.5, 1.0).
    let per_mille = 500 + (jitter % 1000) / 2;
    base.saturating_mul(u32::try_from(per_mille).unwrap_or(500)) / 1000
}

/// How many attempts a call may make over `n` coordinators.
pub(crate) fn max_attempts(n: usize) -> usize {
    ROUNDS * n.max(1)
}

/// Appends "tried A (why), B (why)" to an error from the last of several attempts.
pub(crate) fn name_tried(error: Error, tried: &[(SocketAddr, String)]) -> Error {
    if tried.len() < 2 {
        return error;
    }
    let list = tried
        .iter()
        .map(|(addr, why)| format!("{addr} ({why})"))
        .collect::<Vec<_>>()
        .join(", ");
    match error {
        Error::Unreachable { addr, detail, hint } => Error::Unreachable {
            addr,
            detail: format!("{detail}; coordinators tried, in order: {list}"),
            hint,
        },
        Error::Refused {
            op,
            code,
            message,
            hint,
        } => Error::Refused {
            op,
            code,
            message,
            hint: format!("{hint}\n(after failing over; coordinators tried, in order: {list})"),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(std::io::Error);
    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("transport error")
        }
    }
    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    /// A status as tonic makes it from a transport failure: the failure as its source.
    fn transport(code: tonic::Code, io: std::io::Error) -> tonic::Status {
        let mut s = tonic::Status::new(code, "transport error");
        s.set_source(Arc::new(Wrapped(io)));
        s
    }

    #[test]
    fn statuses_a_coordinator_sent_are_final_except_unavailable() {
        for status in [
            tonic::Status::permission_denied("policy"),
            tonic::Status::invalid_argument("bad"),
            tonic::Status::not_found("no key"),
            tonic::Status::unauthenticated("no certificate"),
            tonic::Status::deadline_exceeded("slow"),
            tonic::Status::internal("bug"),
            tonic::Status::already_exists("key"),
        ] {
            assert_eq!(classify(&status), Failure::Final, "{status:?}");
        }
        assert_eq!(
            classify(&tonic::Status::unavailable("store down")),
            Failure::Retryable
        );
    }

    #[test]
    fn transport_failures_are_retryable_and_refused_connections_unsent() {
        let reset = transport(
            tonic::Code::Unknown,
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset"),
        );
        assert_eq!(classify(&reset), Failure::Retryable);
        let internal = transport(
            tonic::Code::Internal,
            std::io::Error::other("h2 protocol error: stream no longer needed"),
        );
        assert_eq!(classify(&internal), Failure::Retryable);
        let refused = transport(
            tonic::Code::Unavailable,
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "Connection refused (os error 111)",
            ),
        );
        assert_eq!(classify(&refused), Failure::Unsent);
        let broke = transport(
            tonic::Code::Unavailable,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "TLS handshake with coordinator at 127.0.0.1:1 failed: unexpected EOF",
            ),
        );
        assert_eq!(classify(&broke), Failure::Unsent);
        let alert = transport(
            tonic::Code::Unavailable,
            std::io::Error::other(
                "TLS handshake with coordinator failed: received fatal alert: UnknownCA",
            ),
        );
        assert_eq!(classify(&alert), Failure::Final);
    }

    #[test]
    fn only_idempotent_calls_survive_a_lost_request() {
        assert!(Failure::Unsent.allows(Retry::Idempotent));
        assert!(Failure::Unsent.allows(Retry::Unsent));
        assert!(Failure::Retryable.allows(Retry::Idempotent));
        assert!(!Failure::Retryable.allows(Retry::Unsent));
        assert!(!Failure::Final.allows(Retry::Idempotent));
        assert!(!Failure::Final.allows(Retry::Unsent));
        assert_eq!(classify_connect("Connection refused"), Failure::Unsent);
        assert_eq!(
            classify_connect("invalid peer certificate: UnknownIssuer"),
            Failure::Final
        );
    }

    #[test]
    fn backoff_is_zero_in_the_first_round_then_grows_with_jitter() {
        assert_eq!(backoff(0, 3, 7), Duration::ZERO);
        assert_eq!(backoff(2, 3, 7), Duration::ZERO);
        let first = backoff(3, 3, 0);
        assert_eq!(first, BACKOFF / 2);
        let high = backoff(3, 3, 999);
        assert!(high < BACKOFF && high > first, "{high:?}");
        assert_eq!(backoff(6, 3, 0), BACKOFF);
        assert_eq!(backoff(1, 1, 0), BACKOFF / 2);
        assert!(backoff(1000, 1, 999) <= BACKOFF * 64);
        assert_eq!(max_attempts(1), 3);
        assert_eq!(max_attempts(3), 9);
    }

    #[test]
    fn the_last_error_names_every_coordinator_tried() {
        let a: SocketAddr = "127.0.0.1:7100".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:7100".parse().unwrap();
        let tried = vec![
            (a, "connection refused".to_owned()),
            (b, "UNAVAILABLE".to_owned()),
        ];
        let e = name_tried(Error::connect(b, "gone".to_owned()), &tried);
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.1:7100 (connection refused)")
                && text.contains("127.0.0.2:7100 (UNAVAILABLE)"),
            "{text}"
        );
        assert_eq!(e.exit_code(), 3);
        let e = name_tried(
            Error::from_status("sign", b, &tonic::Status::permission_denied("no")),
            &tried,
        );
        assert!(e.to_string().contains("127.0.0.1:7100"), "{e}");
        assert_eq!(e.exit_code(), 4);
    }
}
