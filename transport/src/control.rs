//! Control-plane connections between duet processes: authenticated QUIC connections that carry
//! length-prefixed messages in both directions on one stream.
//!
//! A gateway runs a [`ControlListener`] on its cluster port; each worker process [`connect`]s to
//! it. Every connection first proves the cluster secret exactly as the KV data path does
//! (`quic.rs` module docs), under its own domain ("duet-ctl"), so a tag made for one plane cannot
//! be replayed on the other. The client then opens the control stream with a hello that names the
//! caller's protocol version; a server speaking another version refuses it with its own version,
//! so mixed deployments fail at connect time with a message instead of misreading messages.
//!
//! On the stream each message is a little-endian `u32` length and that many bytes (the caller's
//! encoding: rkyv in `duet-actors`); a length above [`CONTROL_MSG_MAX`] is a protocol error read
//! before anything is allocated. Sends go through a bounded queue ([`CONTROL_SEND_QUEUE_MAX`]) to
//! one writer task per connection, so any task can send without holding the stream.
//!
//! Liveness: QUIC keep-alives every [`KEEP_ALIVE`] and an idle timeout of [`IDLE_TIMEOUT`] close a
//! connection whose peer died (a SIGKILLed process sends nothing), so both sides learn of a dead
//! peer within that bound even when no message is due.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, Endpoint, RecvStream, VarInt};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::TransportError;
use crate::quic::{
    AUTH_PENDING_MAX, AUTH_TIMEOUT, CODE_AUTH, CONNECT_TIMEOUT, ClusterSecret, auth_failure,
    client_config_for, client_handshake, server_config_for, server_handshake,
};

const ALPN: &[u8] = b"duet-ctl/1";
const DOMAIN: &str = "duet-ctl";
const SERVER_NAME: &str = "duet-ctl";
const HELLO_MAGIC: [u8; 4] = *b"DUCP";
/// Hello: magic, version u16, reserved u16.
const HELLO_LEN: usize = 8;
const HELLO_OK: u8 = 0;
const HELLO_VERSION: u8 = 1;

/// Largest control message: a job carries its prompt (4 bytes per token), so 16 MiB holds a
/// 4-million-token context with room to spare; anything larger is a protocol error.
pub const CONTROL_MSG_MAX: usize = 16 << 20;
/// Messages a connection may have queued for its writer before senders wait.
pub const CONTROL_SEND_QUEUE_MAX: usize = 4096;
/// Messages read off a connection and not yet taken by its owner before reading pauses (and QUIC
/// flow control holds the peer back).
pub const CONTROL_RECV_QUEUE_MAX: usize = 4096;
/// Accepted connections waiting for the owner's `accept` before new ones wait in QUIC.
pub const CONTROL_ACCEPT_QUEUE_MAX: usize = 64;
/// QUIC keep-alive interval: well under the idle timeout, so a live but quiet peer never times
/// out.
pub const KEEP_ALIVE: Duration = Duration::from_millis(250);
/// A peer silent for this long is dead and its connection closed (bounded dead-peer detection).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Connection closed because the versions differ.
const CODE_VERSION: VarInt = VarInt::from_u32(0x56);
/// Connection closed by its owner.
const CODE_BYE: VarInt = VarInt::from_u32(0x42);

fn control_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // The handshake stream and the control stream.
    t.max_concurrent_bidi_streams(VarInt::from_u32(2));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        IDLE_TIMEOUT
            .try_into()
            .expect("2 s fits QUIC's idle timeout"),
    ));
    Arc::new(t)
}

/// One authenticated control connection.
pub struct ControlConn {
    pub peer: SocketAddr,
    pub tx: ControlTx,
    pub rx: ControlRx,
    conn: Connection,
    /// A client keeps its endpoint alive with the connection.
    _endpoint: Option<Endpoint>,
}

impl std::fmt::Debug for ControlConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlConn")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl ControlConn {
    fn new(
        conn: Connection,
        send: quinn::SendStream,
        recv: RecvStream,
        ep: Option<Endpoint>,
    ) -> Self {
        let (queue, mut rx) = mpsc::channel::<Vec<u8>>(CONTROL_SEND_QUEUE_MAX);
        let (inbox_tx, inbox) = mpsc::channel(CONTROL_RECV_QUEUE_MAX);
        tokio::spawn(read_messages(recv, inbox_tx));
        let mut send = send;
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                let len = (msg.len() as u32).to_le_bytes();
                let mut chunks = [Bytes::copy_from_slice(&len), Bytes::from(msg)];
                if send.write_all_chunks(&mut chunks).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        });
        Self {
            peer: conn.remote_address(),
            tx: ControlTx { queue },
            rx: ControlRx { inbox },
            conn,
            _endpoint: ep,
        }
    }

    /// Closes the connection now; the peer's `recv` fails at once.
    pub fn close(&self, reason: &str) {
        self.conn.close(CODE_BYE, reason.as_bytes());
    }

    /// A handle that can close the connection after the halves moved elsewhere.
    pub fn closer(&self) -> ControlCloser {
        ControlCloser(self.conn.clone())
    }
}

#[derive(Clone)]
pub struct ControlCloser(Connection);

impl std::fmt::Debug for ControlCloser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlCloser(..)")
    }
}

impl ControlCloser {
    pub fn close(&self, reason: &str) {
        self.0.close(CODE_BYE, reason.as_bytes());
    }
}

/// The sending half: cheap to clone; messages leave in the order they were queued.
#[derive(Clone, Debug)]
pub struct ControlTx {
    queue: mpsc::Sender<Vec<u8>>,
}

impl ControlTx {
    /// Queues one message, waiting while the queue is full.
    pub async fn send(&self, msg: Vec<u8>) -> Result<(), TransportError> {
        if msg.len() > CONTROL_MSG_MAX {
            return Err(TransportError::FrameTooLarge {
                bytes: msg.len(),
                max: CONTROL_MSG_MAX,
            });
        }
        self.queue
            .send(msg)
            .await
            .map_err(|_| TransportError::Protocol("control connection closed".into()))
    }

    pub fn is_closed(&self) -> bool {
        self.queue.is_closed()
    }
}

/// The receiving half. `recv` is cancellation-safe: a reader task owns the stream and hands over
/// whole messages, so dropping a `recv` future (a `select!` whose other branch won, a timeout)
/// never loses part of a message and never desynchronises the framing.
#[derive(Debug)]
pub struct ControlRx {
    inbox: mpsc::Receiver<Result<Vec<u8>, TransportError>>,
}

impl ControlRx {
    /// The next message; `Ok(None)` when the peer finished the stream cleanly, `Err` when the
    /// connection was lost (timed out, closed, reset) or the peer broke the framing.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, TransportError> {
        self.inbox.recv().await.transpose()
    }
}

/// Reads whole messages off the stream until it ends, fails, or the receiver goes away.
async fn read_messages(mut recv: RecvStream, out: mpsc::Sender<Result<Vec<u8>, TransportError>>) {
    loop {
        let mut len = [0u8; 4];
        let msg = match recv.read_exact(&mut len).await {
            Ok(()) => {
                let len = u32::from_le_bytes(len) as usize;
                if len > CONTROL_MSG_MAX {
                    Err(TransportError::FrameTooLarge {
                        bytes: len,
                        max: CONTROL_MSG_MAX,
                    })
                } else {
                    let mut buf = vec![0u8; len];
                    recv.read_exact(&mut buf).await.map(|()| buf).map_err(lost)
                }
            }
            Err(quinn::ReadExactError::FinishedEarly(0)) => return,
            Err(e) => Err(lost(e)),
        };
        let last = msg.is_err();
        if out.send(msg).await.is_err() || last {
            return;
        }
    }
}

fn lost(e: quinn::ReadExactError) -> TransportError {
    match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            TransportError::Protocol("control message cut short".into())
        }
        quinn::ReadExactError::ReadError(e) => {
            TransportError::Protocol(format!("control connection lost: {e}"))
        }
    }
}

/// A gateway's cluster port: authenticated, version-checked control connections.
pub struct ControlListener {
    endpoint: Endpoint,
    incoming: mpsc::Receiver<ControlConn>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for ControlListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlListener")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl ControlListener {
    /// Listens on `addr` for peers that prove `secret` and speak `version`. Must run inside a
    /// tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        secret: ClusterSecret,
        version: u16,
    ) -> Result<Self, TransportError> {
        let endpoint = Endpoint::server(server_config_for(ALPN, control_transport())?, addr)
            .map_err(|e| TransportError::Setup(format!("control plane listen on {addr}: {e}")))?;
        let (tx, incoming) = mpsc::channel(CONTROL_ACCEPT_QUEUE_MAX);
        let task = tokio::spawn(accept_loop(endpoint.clone(), secret, version, tx));
        Ok(Self {
            endpoint,
            incoming,
            task,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Setup(format!("control plane local address: {e}")))
    }

    /// The next authenticated peer; `None` once the listener stopped.
    pub async fn accept(&mut self) -> Option<ControlConn> {
        self.incoming.recv().await
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        self.task.abort();
        self.endpoint.close(CODE_BYE, b"gateway shutting down");
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    secret: ClusterSecret,
    version: u16,
    out: mpsc::Sender<ControlConn>,
) {
    let pending = Arc::new(Semaphore::new(AUTH_PENDING_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let secret = secret.clone();
        let out = out.clone();
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(AUTH_TIMEOUT, incoming).await else {
                return;
            };
            let setup = async {
                server_handshake(&conn, &secret, DOMAIN).await?;
                let (mut send, mut recv) = conn
                    .accept_bi()
                    .await
                    .map_err(|e| TransportError::Protocol(e.to_string()))?;
                let mut hello = [0u8; HELLO_LEN];
                recv.read_exact(&mut hello)
                    .await
                    .map_err(|e| TransportError::Protocol(e.to_string()))?;
                if hello[0..4] != HELLO_MAGIC {
                    return Err(TransportError::Protocol("bad control hello".into()));
                }
                let theirs = u16::from_le_bytes([hello[4], hello[5]]);
                if theirs != version {
                    let mut reply = vec![HELLO_VERSION];
                    reply.extend_from_slice(&version.to_le_bytes());
                    let _ = send.write_all(&reply).await;
                    let _ = send.finish();
                    return Err(TransportError::Protocol(format!(
                        "peer speaks control protocol v{theirs}, this gateway v{version}"
                    )));
                }
                send.write_all(&[HELLO_OK, 0, 0])
                    .await
                    .map_err(|e| TransportError::Protocol(e.to_string()))?;
                Ok((send, recv))
            };
            match tokio::time::timeout(AUTH_TIMEOUT, setup).await {
                Ok(Ok((send, recv))) => {
                    drop(permit);
                    let _ = out.send(ControlConn::new(conn, send, recv, None)).await;
                }
                Ok(Err(TransportError::Protocol(why))) => {
                    tracing::warn!("control peer {} refused: {why}", conn.remote_address());
                    // Give the version reply a moment to leave before closing.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    conn.close(CODE_VERSION, why.as_bytes());
                }
                _ => {
                    tracing::warn!(
                        "control peer {} failed the cluster-secret handshake",
                        conn.remote_address()
                    );
                    conn.close(CODE_AUTH, b"authentication failed");
                }
            }
        });
    }
}

/// Connects to a gateway's cluster port, proves the secret and opens the control stream.
/// `TransportError::Auth` means the credential was refused (not worth retrying);
/// `TransportError::Connect` that the gateway could not be reached (worth retrying).
pub async fn connect(
    addr: SocketAddr,
    secret: &ClusterSecret,
    version: u16,
) -> Result<ControlConn, TransportError> {
    let local: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let unreachable = |detail: String| TransportError::Connect { dest: 0, detail };
    let endpoint = Endpoint::client(local)
        .map_err(|e| TransportError::Setup(format!("control plane client: {e}")))?;
    let cfg = client_config_for(ALPN, control_transport())?;
    let setup = async {
        let conn = endpoint
            .connect_with(cfg, addr, SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        if let Err(e) = client_handshake(&conn, secret, DOMAIN).await {
            return Err(match auth_failure(&conn, e) {
                TransportError::Auth(why) => TransportError::Auth(why),
                // The server closes the connection when our proof fails; reading its verdict
                // then fails with the connection error.
                other => match conn.close_reason() {
                    Some(quinn::ConnectionError::ApplicationClosed(c))
                        if c.error_code == CODE_AUTH =>
                    {
                        TransportError::Auth("the gateway refused the cluster secret".into())
                    }
                    _ => other,
                },
            });
        }
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut hello = HELLO_MAGIC.to_vec();
        hello.extend_from_slice(&version.to_le_bytes());
        hello.extend_from_slice(&[0, 0]);
        send.write_all(&hello)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut reply = [0u8; 3];
        recv.read_exact(&mut reply)
            .await
            .map_err(|e| unreachable(format!("control hello: {e}")))?;
        match reply[0] {
            HELLO_OK => Ok(ControlConn::new(conn, send, recv, Some(endpoint.clone()))),
            HELLO_VERSION => Err(TransportError::Protocol(format!(
                "the gateway speaks control protocol v{}, this process v{version}",
                u16::from_le_bytes([reply[1], reply[2]])
            ))),
            s => Err(TransportError::Protocol(format!(
                "control hello status {s}"
            ))),
        }
    };
    tokio::time::timeout(CONNECT_TIMEOUT, setup)
        .await
        .map_err(|_| {
            unreachable(format!(
                "no control connection to {addr} within {CONNECT_TIMEOUT:?}"
            ))
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &[u8]) -> ClusterSecret {
        ClusterSecret::new(s).unwrap()
    }

    async fn listener(v: u16) -> (ControlListener, SocketAddr) {
        let l = ControlListener::bind(
            "127.0.0.1:0".parse().unwrap(),
            secret(b"a cluster secret of 32 bytes...."),
            v,
        )
        .unwrap();
        let addr = l.local_addr().unwrap();
        (l, addr)
    }

    #[tokio::test]
    async fn messages_cross_both_ways_in_order() {
        let (mut l, addr) = listener(3).await;
        let client = tokio::spawn(async move {
            connect(addr, &secret(b"a cluster secret of 32 bytes...."), 3).await
        });
        let mut server = l.accept().await.unwrap();
        let mut client = client.await.unwrap().unwrap();
        for i in 0..100u32 {
            client.tx.send(vec![i as u8; i as usize]).await.unwrap();
        }
        for i in 0..100u32 {
            let m = server.rx.recv().await.unwrap().unwrap();
            assert_eq!(m, vec![i as u8; i as usize]);
        }
        server.tx.send(b"welcome".to_vec()).await.unwrap();
        assert_eq!(client.rx.recv().await.unwrap().unwrap(), b"welcome");
        // A large message (a long prompt) crosses intact.
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        server.tx.send(big.clone()).await.unwrap();
        assert_eq!(client.rx.recv().await.unwrap().unwrap(), big);
        assert!(matches!(
            server.tx.send(vec![0; CONTROL_MSG_MAX + 1]).await,
            Err(TransportError::FrameTooLarge { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_abandoned_recv_loses_nothing() {
        // The worker link polls `recv` inside `select!` next to a timer; a timer tick in the
        // middle of a large message must not cost the message or the framing after it.
        let (mut l, addr) = listener(1).await;
        let client = tokio::spawn(async move {
            connect(addr, &secret(b"a cluster secret of 32 bytes...."), 1).await
        });
        let server = l.accept().await.unwrap();
        let mut client = client.await.unwrap().unwrap();
        let msgs: Vec<Vec<u8>> = (0..40u32)
            .map(|i| vec![i as u8; 1 + (i as usize * 37_123) % 400_000])
            .collect();
        let tx = server.tx.clone();
        let sent = msgs.clone();
        tokio::spawn(async move {
            for m in sent {
                tx.send(m).await.unwrap();
            }
        });
        let mut got = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_micros(50));
        while got.len() < msgs.len() {
            tokio::select! {
                m = client.rx.recv() => got.push(m.unwrap().unwrap()),
                _ = tick.tick() => {}
            }
        }
        assert!(got == msgs, "messages lost or reordered");
    }

    #[tokio::test]
    async fn a_wrong_secret_is_refused_and_never_accepted() {
        let (mut l, addr) = listener(1).await;
        let r = connect(addr, &secret(b"not the cluster secret at all..."), 1).await;
        assert!(matches!(r, Err(TransportError::Auth(_))), "{r:?}");
        // The listener never handed the intruder out.
        let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
        assert!(accepted.is_err(), "an unauthenticated peer was accepted");
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_with_both_versions_named() {
        let (_l, addr) = listener(2).await;
        let r = connect(addr, &secret(b"a cluster secret of 32 bytes...."), 1).await;
        match r {
            Err(TransportError::Protocol(m)) => {
                assert!(m.contains("v2") && m.contains("v1"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_unreachable_gateway_is_a_connect_error() {
        // Bind and drop a UDP socket to get a port nobody listens on.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let r = connect(port, &secret(b"a cluster secret of 32 bytes...."), 1).await;
        assert!(matches!(r, Err(TransportError::Connect { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn a_closed_peer_ends_the_other_side() {
        let (mut l, addr) = listener(1).await;
        let client = tokio::spawn(async move {
            connect(addr, &secret(b"a cluster secret of 32 bytes...."), 1).await
        });
        let mut server = l.accept().await.unwrap();
        let client = client.await.unwrap().unwrap();
        client.close("bye");
        assert!(server.rx.recv().await.is_err());
    }
}
