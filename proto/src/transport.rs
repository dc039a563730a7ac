//! tonic servers and channels over the TLS configurations of [`crate::tls`].
//!
//! TLS is tokio-rustls driven by this module with the configurations of [`crate::tls`];
//! tonic's own TLS builders (`ServerTlsConfig`, `ClientTlsConfig`) are not used.
//!
//! - Server: [`bind`] a listener, then serve the stream of [`incoming`] TLS connections:
//!
//!   ```ignore
//!   let (listener, addr) = transport::bind("127.0.0.1:0".parse()?).await?;
//!   let config = tls::server_config(&identity, &trust, &[RoleKind::Coordinator])?;
//!   tonic::transport::Server::builder()
//!       .add_service(service) // tonic's `router` feature
//!       .serve_with_incoming_shutdown(transport::incoming(listener, config), shutdown)
//!       .await?;
//!   ```
//!
//!   Handlers learn who called with [`peer_role_of`].
//! - Client: [`connect`] (or [`connect_lazy`]) to a role at an address; the TLS server
//!   name is the role's DNS name, so the handshake fails unless the peer holds that
//!   role's certificate.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{Role, TlsError, peer_role};

/// A server-side TLS connection, as yielded by [`incoming`].
pub type ServerTlsStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A client-side TLS connection, as made by [`connect`].
pub type ClientTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// How long a peer may take to complete the TLS handshake before the server drops it.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many server-side handshakes may run at once; further connections wait in the
/// listen backlog.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 256;

/// Client-side limit for TCP connect plus TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Completed handshakes waiting for the server to take them.
const ACCEPTED_QUEUE: usize = 64;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Binds a TCP listener and returns it with its actual address (useful with port 0).
pub async fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Accepts connections on `listener` and yields those that complete a TLS handshake
/// under `config`.
///
/// Handshakes run concurrently (one task each, at most [`MAX_CONCURRENT_HANDSHAKES`],
/// each bounded by [`HANDSHAKE_TIMEOUT`]). A failed handshake — wrong CA, refused role,
/// classic-only key exchange, timeout — is logged and the connection dropped: the stream
/// never yields an error, so one bad client cannot stop the server. The `Result` item
/// type is what `tonic::transport::Server::serve_with_incoming*` expects.
///
/// Accepting stops when the returned stream is dropped (e.g. when the server shuts
/// down); the listener is closed then.
///
/// # Panics
///
/// Like `tokio::spawn`, if called outside a Tokio runtime.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<ServerTlsStream, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<Result<ServerTlsStream, io::Error>>,
) {
    let local = listener.local_addr().ok();
    let handshakes = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            () = tx.closed() => break,
            permit = Arc::clone(&handshakes).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_closed) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            () = tx.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(?local, %error, "accepting a TCP connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
        };
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    tracing::debug!(%peer, "TLS handshake complete");
                    if tx.send(Ok(tls)).await.is_err() {
                        tracing::debug!(%peer, "server stopped; dropping connection");
                    }
                }
                Ok(Err(error)) if is_disconnect(&error) => {
                    tracing::debug!(%peer, %error, "peer left during the TLS handshake");
                }
                Ok(Err(error)) => {
                    tracing::warn!(%peer, %error, "TLS handshake failed; connection dropped");
                }
                Err(_elapsed) => {
                    tracing::warn!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out; connection dropped");
                }
            }
        });
    }
    tracing::debug!(?local, "stopped accepting connections");
}

/// Connection closed without a TLS-level complaint (TCP health probes, port scans).
fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// The verified role of the peer that sent `req`, from its mTLS certificate.
///
/// Works for servers fed by [`incoming`]: the certificate chain was verified during the
/// handshake, and tonic puts it in the request extensions. Fails with
/// `Status::unauthenticated` if there is no certificate or it names no role of `domain`.
#[allow(clippy::result_large_err)] // `tonic::Status` is what handlers return.
pub fn peer_role_of<T>(req: &tonic::Request<T>, domain: &str) -> Result<Role, tonic::Status> {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .ok_or_else(|| {
            tonic::Status::unauthenticated(
                "no client certificate on this connection: connect with mutual TLS using a \
                 certificate from the cluster CA",
            )
        })?;
    peer_role(&certs, domain).map_err(|e| tonic::Status::unauthenticated(e.to_string()))
}

/// The certificate chain (leaf first) the peer that sent `req` presented and the TLS
/// handshake verified, if any.
pub fn peer_chain_of<T>(
    req: &tonic::Request<T>,
) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
    req.extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(TlsConnectInfo::peer_certs)
        .map(|c| c.iter().cloned().collect())
}

/// Connects to the peer holding `server`'s certificate at `addr` and returns a gRPC
/// channel. Fails if TCP, the TLS handshake (including the server-name check against
/// `server.dns_name(domain)`) or the HTTP/2 set-up fails.
///
/// A channel reconnects by itself (with the same checks) if the connection drops.
pub async fn connect(
    addr: SocketAddr,
    server: &Role,
    domain: &str,
    config: Arc<ClientConfig>,
) -> Result<Channel, TlsError> {
    let endpoint = endpoint(addr)?;
    let connector = RoleConnector::new(addr, server, domain, config)?;
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| TlsError::Connect {
            addr,
            server: server.clone(),
            reason: error_chain(&e),
        })
}

/// Like [`connect`], but returns at once: the channel connects on first use (and
/// reconnects later), so a coordinator can start while a node is down. Errors are
/// reported by the calls made on the channel.
pub fn connect_lazy(
    addr: SocketAddr,
    server: &Role,
    domain: &str,
    config: Arc<ClientConfig>,
) -> Result<Channel, TlsError> {
    let endpoint = endpoint(addr)?;
    let connector = RoleConnector::new(addr, server, domain, config)?;
    Ok(endpoint.connect_with_connector_lazy(connector))
}

fn endpoint(addr: SocketAddr) -> Result<Endpoint, TlsError> {
    // The scheme is `http` because TLS is done by the connector, not by tonic.
    Endpoint::from_shared(format!("http://{addr}"))
        .map(|endpoint| endpoint.connect_timeout(CONNECT_TIMEOUT))
        .map_err(|e| TlsError::InvalidEndpoint {
            addr,
            reason: error_chain(&e),
        })
}

/// `e` and its sources, joined by ": ".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// tower connector for tonic: TCP to a fixed address, then TLS with the server name of
/// the expected role.
#[derive(Clone)]
struct RoleConnector {
    addr: SocketAddr,
    server: Role,
    server_name: ServerName<'static>,
    tls: TlsConnector,
}

impl RoleConnector {
    fn new(
        addr: SocketAddr,
        server: &Role,
        domain: &str,
        config: Arc<ClientConfig>,
    ) -> Result<Self, TlsError> {
        let name = server.dns_name(domain);
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| TlsError::InvalidServerName { name })?;
        Ok(Self {
            addr,
            server: server.clone(),
            server_name,
            tls: TlsConnector::from(config),
        })
    }
}

impl tower::Service<Uri> for RoleConnector {
    type Response = TokioIo<ClientTlsStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await?;
            tcp.set_nodelay(true)?;
            let tls = this.tls.connect(this.server_name, tcp).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "TLS handshake with {} at {} failed: {e}",
                        this.server, this.addr
                    ),
                )
            })?;
            Ok(TokioIo::new(tls))
        })
    }
}
