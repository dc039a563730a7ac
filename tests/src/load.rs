//! Concurrent signers against a [`TestCluster`]: raw signatures of distinct messages
//! through `KeyService.Sign`, each checked with an independent verifier, while a test
//! injects a fault or runs a lifecycle operation. What they saw — signatures, failed
//! requests by status, requests unanswered at their deadline, the longest stretch without
//! a signature — is returned for the test to assert on and print.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use quorate_proto::api;

use crate::{TestCluster, verify_es256};

/// A client's deadline for one request; one unanswered by then counts as hung.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A client's shortest pause after a failed request.
pub const BACKOFF: Duration = Duration::from_millis(100);

/// Statuses a client retries (the CLI reports the first two as "cluster unreachable",
/// `client/src/error.rs`; `ResourceExhausted` asks to retry shortly). `Cancelled` is
/// how the HTTP/2 client reports a stream the restarting coordinator cut; signing and
/// token issuance are safe to retry after it (the CLI does not retry it yet).
pub const RETRYABLE: [tonic::Code; 4] = [
    tonic::Code::Unavailable,
    tonic::Code::DeadlineExceeded,
    tonic::Code::ResourceExhausted,
    tonic::Code::Cancelled,
];

/// What the signers saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Signatures, every one verified.
    pub ok: u64,
    /// Failed requests: status and message.
    pub failed: Vec<(tonic::Code, String)>,
    /// Requests unanswered at [`DEADLINE`].
    pub hung: u64,
    /// The longest stretch without a signature, across all signers, from the start of
    /// the load to its end.
    pub longest_gap: Duration,
    /// How long the load ran.
    pub ran: Duration,
}

impl Seen {
    /// The failures whose status a client does not retry.
    pub fn fatal(&self) -> Vec<&(tonic::Code, String)> {
        self.failed
            .iter()
            .filter(|(code, _)| !RETRYABLE.contains(code))
            .collect()
    }
}

/// What one signer saw: signatures, the instants they arrived, failures, hung requests.
type SignerSeen = (u64, Vec<Instant>, Vec<(tonic::Code, String)>, u64);

/// Running signers ([`SignLoad::start`]); [`SignLoad::finish`] stops them.
pub struct SignLoad {
    stop: Arc<AtomicBool>,
    started: Instant,
    tasks: Vec<tokio::task::JoinHandle<SignerSeen>>,
}

impl SignLoad {
    /// Starts `signers` clients signing distinct messages with key `name` as the admin
    /// client, each pausing `pace` after a request (at least [`BACKOFF`] after a failed
    /// one). Every signature must verify under `public` (compressed SEC1): a bad one
    /// panics the signer, and [`SignLoad::finish`] with it.
    pub async fn start(
        c: &TestCluster,
        name: &str,
        public: &[u8],
        signers: usize,
        pace: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::with_capacity(signers);
        for s in 0..signers {
            let ch = c.api_channel().await;
            let (stop, name, public) = (Arc::clone(&stop), name.to_owned(), public.to_vec());
            tasks.push(tokio::spawn(async move {
                let mut keys = api::key_service_client::KeyServiceClient::new(ch);
                let (mut ok, mut at, mut failed, mut hung) = (0, Vec::new(), Vec::new(), 0);
                let mut k = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let msg = format!("signer {s} message {k}");
                    let r = tokio::time::timeout(
                        DEADLINE,
                        keys.sign(api::SignRequest {
                            name: name.clone(),
                            input: Some(api::sign_request::Input::Message(
                                msg.clone().into_bytes(),
                            )),
                            format: api::SignatureFormat::Raw as i32,
                        }),
                    )
                    .await;
                    let pause = match r {
                        Ok(Ok(sig)) => {
                            verify_es256(&public, msg.as_bytes(), &sig.into_inner().signature);
                            ok += 1;
                            at.push(Instant::now());
                            pace
                        }
                        Ok(Err(e)) => {
                            failed.push((e.code(), e.message().to_owned()));
                            pace.max(BACKOFF)
                        }
                        Err(_) => {
                            hung += 1;
                            pace.max(BACKOFF)
                        }
                    };
                    tokio::time::sleep(pause).await;
                }
                (ok, at, failed, hung)
            }));
        }
        SignLoad {
            stop,
            started: Instant::now(),
            tasks,
        }
    }

    /// Stops the signers (each finishes its request in flight) and sums up what they saw.
    pub async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = Seen::default();
        let mut at = Vec::new();
        for t in self.tasks {
            let (ok, times, failed, hung) = t.await.expect("a signer panicked");
            seen.ok += ok;
            at.extend(times);
            seen.failed.extend(failed);
            seen.hung += hung;
        }
        let end = Instant::now();
        at.sort();
        let mut last = self.started;
        for t in at {
            seen.longest_gap = seen.longest_gap.max(t.saturating_duration_since(last));
            last = last.max(t);
        }
        seen.longest_gap = seen.longest_gap.max(end.saturating_duration_since(last));
        seen.ran = end - self.started;
        seen
    }
}
