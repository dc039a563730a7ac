//! A fault-injecting TCP proxy for multi-host tests (DESIGN.md §10): one [`Link`] per
//! connection path (coordinator → node `i`), listening in the test's root namespace and
//! forwarding to the node's address, with faults set at run time.
//!
//! The kernel here has no netem, so the faults are made in user space, per connection
//! and per direction ("to target": coordinator → node; "to client": node → coordinator):
//!
//! - **Delay**: every chunk read on one side is written to the other no earlier than
//!   the delay after it was read, chunks in order; the delay in force when a chunk is
//!   read applies to it. This adds one-way latency without limiting throughput, like a
//!   long link.
//! - **Loss**: TCP hides lost segments behind retransmission, so what an application
//!   sees of loss is its stream stalling until the retransmission, head-of-line: here
//!   each chunk is, with the given probability, held for an extra stall time (200 ms, the
//!   Linux minimum retransmission timeout, is a realistic value) before it and everything
//!   behind it goes on. Nothing is dropped or altered. Resets, the other face of a bad
//!   network, are [`Link::cut`].
//! - **Partition** ([`Link::partition`], a blackhole): no byte crosses in either
//!   direction. Existing connections stay open and stall; new connections are accepted
//!   (a client's connect succeeds, as into a middlebox) but reach nothing. What was sent
//!   meanwhile is held and delivered after [`Link::heal`], as TCP's retransmissions
//!   would, unless the endpoints gave up and closed first.
//! - **Refuse** ([`Link::refuse`]): the listener is closed, so connects are refused at
//!   once (RST), and existing connections are reset: a host that is up but not serving.
//! - **Cut** ([`Link::cut`]): resets every connection open now (`SO_LINGER` 0, so both
//!   ends get a RST); new ones are not affected.
//! - [`Link::heal`] clears every fault.
//!
//! The proxy runs on its own Tokio runtime (two worker threads), so a test that blocks
//! its own threads (starting processes, say) does not slow the links. Dropping the
//! [`FaultProxy`] stops it and closes every connection.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How a link carries bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Forwards (with the delays and stalls set).
    #[default]
    Pass,
    /// Carries nothing; connections stay open and stall.
    Blackhole,
    /// Refuses connections; open ones are reset.
    Refuse,
}

/// The faults of one link.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// One-way delay added to bytes going to the target.
    pub delay_to_target: Duration,
    /// One-way delay added to bytes going back to the client.
    pub delay_to_client: Duration,
    /// Probability (0..=1) that a chunk stalls (see the module docs on loss).
    pub stall_probability: f64,
    /// How long a stalled chunk is held.
    pub stall: Duration,
    /// Pass, blackhole or refuse.
    pub mode: Mode,
    /// Incremented by [`Link::cut`]: connections made before it are reset.
    cut_epoch: u64,
}

/// What crossed a link.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Bytes written to the target.
    pub bytes_to_target: AtomicU64,
    /// Bytes written back to the client.
    pub bytes_to_client: AtomicU64,
    /// Chunks held for a loss stall.
    pub stalls: AtomicU64,
    /// Connections reset by a cut or refuse.
    pub resets: AtomicU64,
}

/// One proxied path: `listen` → `target`.
#[derive(Debug)]
pub struct Link {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where the proxy forwards to.
    pub target: SocketAddr,
    faults: watch::Sender<Faults>,
    stats: Arc<Stats>,
}

impl Link {
    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.faults.borrow().clone()
    }

    /// Sets the one-way delay of each direction.
    pub fn set_delay(&self, to_target: Duration, to_client: Duration) {
        self.faults.send_modify(|f| {
            f.delay_to_target = to_target;
            f.delay_to_client = to_client;
        });
    }

    /// Makes each chunk stall for `stall` with probability `probability`.
    pub fn set_loss(&self, probability: f64, stall: Duration) {
        self.faults.send_modify(|f| {
            f.stall_probability = probability.clamp(0.0, 1.0);
            f.stall = stall;
        });
    }

    /// Partitions the link: a blackhole in both directions.
    pub fn partition(&self) {
        self.faults.send_modify(|f| f.mode = Mode::Blackhole);
    }

    /// Refuses connections and resets the open ones.
    pub fn refuse(&self) {
        self.faults.send_modify(|f| {
            f.mode = Mode::Refuse;
            f.cut_epoch += 1;
        });
    }

    /// Resets every open connection.
    pub fn cut(&self) {
        self.faults.send_modify(|f| f.cut_epoch += 1);
    }

    /// Clears every fault: no delay, no loss, bytes flow.
    pub fn heal(&self) {
        self.faults.send_modify(|f| {
            *f = Faults {
                cut_epoch: f.cut_epoch,
                ..Faults::default()
            };
        });
    }

    /// What crossed the link so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// A set of links served by one runtime of their own.
#[derive(Debug)]
pub struct FaultProxy {
    links: Vec<Link>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FaultProxy {
    /// Listens on each `(listen, target)` pair's `listen` address (port 0 picks one;
    /// [`Link::listen`] tells which) and forwards to its target. `seed` makes the loss
    /// stalls reproducible (print it).
    pub fn start(pairs: &[(SocketAddr, SocketAddr)], seed: u64) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("faultproxy")
            .enable_all()
            .build()?;
        let mut links = Vec::with_capacity(pairs.len());
        let connection_seed = Arc::new(AtomicU64::new(seed));
        for &(listen, target) in pairs {
            let std_listener = std::net::TcpListener::bind(listen)?;
            std_listener.set_nonblocking(true)?;
            let listen = std_listener.local_addr()?;
            let (faults, rx) = watch::channel(Faults::default());
            let stats = Arc::new(Stats::default());
            let listener = {
                let _guard = runtime.enter();
                TcpListener::from_std(std_listener)?
            };
            runtime.spawn(serve(
                listener,
                listen,
                target,
                rx,
                Arc::clone(&stats),
                Arc::clone(&connection_seed),
            ));
            links.push(Link {
                listen,
                target,
                faults,
                stats,
            });
        }
        Ok(FaultProxy {
            links,
            runtime: Some(runtime),
        })
    }

    /// Link `k` (in the order given to [`FaultProxy::start`]).
    pub fn link(&self, k: usize) -> &Link {
        &self.links[k]
    }

    /// All links.
    pub fn links(&self) -> &[Link] {
        &self.links
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Accepts on `listener` until the link is dropped; closes it while refusing.
async fn serve(
    listener: TcpListener,
    listen: SocketAddr,
    target: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    stats: Arc<Stats>,
    seeds: Arc<AtomicU64>,
) {
    let mut listener = Some(listener);
    loop {
        let refusing = faults.borrow_and_update().mode == Mode::Refuse;
        if refusing {
            listener = None;
        } else if listener.is_none() {
            match TcpListener::bind(listen).await {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    // The port is briefly unavailable after close; try again soon.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            changed = faults.changed() => if changed.is_err() { return },
            accepted = async {
                match &listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Ok((client, _)) = accepted {
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    let seed = seeds.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
                    tokio::spawn(connection(client, target, faults.clone(), Arc::clone(&stats), seed));
                }
            }
        }
    }
}

/// Why a connection ended early.
enum End {
    /// Reset by a cut or refuse.
    Cut,
    /// The proxy is gone.
    Closed,
}

/// Waits until bytes may flow: `Ok` in pass mode, `Err` once the connection is cut.
async fn flowing(faults: &mut watch::Receiver<Faults>, epoch: u64) -> Result<(), End> {
    loop {
        {
            let f = faults.borrow_and_update();
            if f.cut_epoch != epoch {
                return Err(End::Cut);
            }
            if f.mode == Mode::Pass {
                return Ok(());
            }
        }
        faults.changed().await.map_err(|_| End::Closed)?;
    }
}

/// Resolves when the connection made in `epoch` is cut (or the proxy is gone).
async fn cut(mut faults: watch::Receiver<Faults>, epoch: u64) {
    loop {
        if faults.borrow_and_update().cut_epoch != epoch {
            return;
        }
        if faults.changed().await.is_err() {
            return;
        }
    }
}

/// Sets `SO_LINGER` to zero, so that closing `s` sends a RST.
#[allow(
    deprecated,
    reason = "tokio deprecates SO_LINGER because a positive linger blocks the closing thread; \
              a zero linger resets at once and never blocks"
)]
fn reset_on_close(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

async fn connection(
    client: TcpStream,
    target: SocketAddr,
    mut faults: watch::Receiver<Faults>,
    stats: Arc<Stats>,
    seed: u64,
) {
    let epoch = faults.borrow().cut_epoch;
    let _ = client.set_nodelay(true);
    // A blackholed link connects to nothing until it heals.
    if flowing(&mut faults, epoch).await.is_err() {
        reset_on_close(&client);
        stats.resets.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let server = tokio::select! {
        s = TcpStream::connect(target) => s,
        () = cut(faults.clone(), epoch) => {
            reset_on_close(&client);
            stats.resets.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let Ok(server) = server else {
        // The target refused or is unreachable: so is the proxy.
        reset_on_close(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let up = pump(
        client_read,
        server_write,
        Direction::ToTarget,
        faults.clone(),
        Arc::clone(&stats),
        seed,
    );
    let down = pump(
        server_read,
        client_write,
        Direction::ToClient,
        faults.clone(),
        Arc::clone(&stats),
        seed ^ 0xff51_afd7_ed55_8ccd,
    );
    // Each pump ends by itself on EOF, an error or a cut (resetting its sockets then).
    tokio::join!(up, down);
}

#[derive(Clone, Copy)]
enum Direction {
    ToTarget,
    ToClient,
}

/// splitmix64: the loss stalls' random numbers (reproducible from the seed).
fn next_random(state: &mut u64) -> f64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Copies `from` to `to` with the link's faults for `direction`, until EOF (then shuts
/// `to` down for writing; a read error counts as EOF), a write error, or a cut (then
/// resets both sockets).
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    faults: watch::Receiver<Faults>,
    stats: Arc<Stats>,
    mut random: u64,
) {
    let epoch = faults.borrow().cut_epoch;
    // Chunks in flight, each with the moment it may be written; bounded, so a stalled
    // direction stops reading (back-pressure) instead of buffering without end.
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(256);
    let mut read_faults = faults.clone();
    let reader = async {
        loop {
            let mut buf = vec![0u8; 16 * 1024];
            let n = from.read(&mut buf).await.unwrap_or(0);
            let delay = {
                let f = read_faults.borrow_and_update();
                match direction {
                    Direction::ToTarget => f.delay_to_target,
                    Direction::ToClient => f.delay_to_client,
                }
            };
            buf.truncate(n);
            let chunk = (n > 0).then_some(buf);
            let last = chunk.is_none();
            if tx.send((Instant::now() + delay, chunk)).await.is_err() || last {
                // The writer goes on with what is queued.
                return std::future::pending::<()>().await;
            }
        }
    };
    let mut write_faults = faults.clone();
    let writer = async {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let (p, stall) = {
                let f = write_faults.borrow();
                (f.stall_probability, f.stall)
            };
            if p > 0.0 && next_random(&mut random) < p {
                stats.stalls.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(stall).await;
            }
            flowing(&mut write_faults, epoch).await?;
            let Some(bytes) = chunk else {
                let _ = to.shutdown().await;
                return Ok(());
            };
            if to.write_all(&bytes).await.is_err() {
                return Ok(());
            }
            let counter = match direction {
                Direction::ToTarget => &stats.bytes_to_target,
                Direction::ToClient => &stats.bytes_to_client,
            };
            counter.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    };
    let ended = tokio::select! {
        written = writer => written,
        () = reader => Ok(()),
        () = cut(faults, epoch) => Err(End::Cut),
    };
    if matches!(ended, Err(End::Cut)) {
        // Both sockets: this pump holds the read half of one and the write half of the
        // other; each closes with a RST once the other pump drops its halves too.
        reset_on_close(from.as_ref());
        reset_on_close(to.as_ref());
        // Dropped, a write half would shut down with a FIN first.
        to.forget();
        stats.resets.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    /// An echo server on 127.0.0.1 and a proxy link in front of it.
    fn echo_link(seed: u64) -> FaultProxy {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let target = server.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in server.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FaultProxy::start(&[("127.0.0.1:0".parse().unwrap(), target)], seed).unwrap()
    }

    fn connect(p: &FaultProxy) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(p.link(0).listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    fn roundtrip(s: &mut std::net::TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        back
    }

    #[test]
    fn delayed_and_stalling_links_deliver_every_byte_in_order() {
        let p = echo_link(7);
        p.link(0)
            .set_delay(Duration::from_millis(5), Duration::from_millis(5));
        p.link(0).set_loss(0.3, Duration::from_millis(2));
        let mut s = connect(&p);
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut w = s.try_clone().unwrap();
            let msg = msg.clone();
            std::thread::spawn(move || w.write_all(&msg).unwrap())
        };
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == msg, "the bytes came back altered or out of order");
        let stats = p.link(0).stats();
        assert!(stats.stalls.load(Ordering::Relaxed) > 0, "no chunk stalled");
        // The proxy counts a chunk after writing it, so the client may read the last
        // bytes a moment before they are counted.
        let t = std::time::Instant::now();
        while stats.bytes_to_client.load(Ordering::Relaxed) < msg.len() as u64
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            stats.bytes_to_client.load(Ordering::Relaxed),
            msg.len() as u64
        );
    }

    #[test]
    fn a_partition_holds_bytes_until_healed() {
        let p = echo_link(1);
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"before"), b"before");
        p.link(0).partition();
        // A new connection is accepted but reaches nothing.
        let mut fresh = connect(&p);
        fresh.write_all(b"held").unwrap();
        s.write_all(b"during").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 6];
        let err = s.read_exact(&mut buf).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "bytes crossed a partition: {err}"
        );
        p.link(0).heal();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"during");
        let mut held = [0u8; 4];
        fresh.read_exact(&mut held).unwrap();
        assert_eq!(&held, b"held");
    }

    #[test]
    fn refuse_resets_open_connections_and_refuses_new_ones_until_healed() {
        let p = echo_link(2);
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"hello"), b"hello");
        p.link(0).refuse();
        let mut buf = [0u8; 1];
        let err = loop {
            // The reset may arrive after a write or two.
            match s.write_all(b"x").and_then(|()| s.read(&mut buf)) {
                Err(e) => break e,
                Ok(0) => panic!("the connection was closed, not reset"),
                Ok(_) => {}
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let refused = (0..100).find_map(|_| match std::net::TcpStream::connect(p.link(0).listen) {
            Err(e) => Some(e),
            Ok(_) => {
                std::thread::sleep(Duration::from_millis(10));
                None
            }
        });
        assert_eq!(
            refused.expect("connections were still accepted").kind(),
            io::ErrorKind::ConnectionRefused
        );
        p.link(0).heal();
        let mut again = (0..100)
            .find_map(|_| {
                std::net::TcpStream::connect(p.link(0).listen)
                    .inspect_err(|_| std::thread::sleep(Duration::from_millis(10)))
                    .ok()
            })
            .expect("the healed link refuses connections");
        again
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(roundtrip(&mut again, b"back"), b"back");
    }

    #[test]
    fn cut_resets_open_connections_only() {
        let p = echo_link(3);
        let mut s = connect(&p);
        assert_eq!(roundtrip(&mut s, b"one"), b"one");
        p.link(0).cut();
        let mut buf = [0u8; 1];
        let err = loop {
            match s.write_all(b"x").and_then(|()| s.read(&mut buf)) {
                Err(e) => break e,
                Ok(0) => panic!("the connection was closed, not reset"),
                Ok(_) => {}
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        let mut fresh = connect(&p);
        assert_eq!(roundtrip(&mut fresh, b"two"), b"two");
    }
}
