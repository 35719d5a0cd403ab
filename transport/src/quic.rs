//! KV frames over QUIC (quinn + rustls with ring): the multi-host fallback data path.
//!
//! A receiving process runs a [`QuicKvServer`] that hosts one or more KV endpoints
//! ([`QuicKvServer::bind`] → [`KvInbox`]). A sending process holds a [`QuicTransport`] with a
//! directory of endpoint → server address ([`QuicTransport::add_peer`]); it keeps one connection
//! per server address and one bidirectional stream per (sender, endpoint), so frames to one
//! endpoint arrive in send order. Wire format and handshake: `transport/README.md`.
//!
//! Authentication. TLS alone cannot say who is in the cluster (the certificates are self-signed,
//! generated at start-up), so every connection first runs a handshake on its first stream in
//! which both sides prove knowledge of the cluster secret: each sends a 32-byte random nonce, and
//! each answers with HMAC-SHA256(secret, role ‖ exporter ‖ client nonce ‖ server nonce), where
//! `exporter` is 32 bytes of TLS keying material exported from this connection (RFC 5705). The
//! exporter binds the proof to this TLS session, so a man in the middle that relays the
//! handshake between two TLS sessions of its own gets two different exporters and fails. The
//! server reads no KV stream before the handshake succeeded, and closes the connection with
//! [`CODE_AUTH`] when it fails or takes longer than [`AUTH_TIMEOUT`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::rustls;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::wire::{self, FrameHeader, HEADER_LEN};
use crate::{EndpointId, KvFrame, KvInbox, KvTransport, SendFuture, TransportError, verified};

/// ALPN protocol id of the KV data path.
const ALPN: &[u8] = b"duet-kv/1";
/// The name the client asks for; the certificate is not checked against it (see module docs).
const SERVER_NAME: &str = "duet-kv";

/// Application error code: connection closed because the handshake failed.
pub const CODE_AUTH: VarInt = VarInt::from_u32(0x41);
/// Stream stopped: the endpoint's receiver is gone.
const CODE_CLOSED: VarInt = VarInt::from_u32(0x43);
/// Stream stopped: the peer sent a malformed frame or stream header.
const CODE_PROTOCOL: VarInt = VarInt::from_u32(0x50);
/// Connection closed: the server or client is shutting down.
const CODE_SHUTDOWN: VarInt = VarInt::from_u32(0x53);

/// A peer must finish the handshake within this time or its connection is closed (5 s: three
/// messages on an established connection take well under a millisecond on a LAN).
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection setup plus handshake from the sender's side (10 s: a QUIC handshake is two round
/// trips; an unreachable server otherwise costs the full idle timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes a server runs at once; further connection attempts are refused until one ends.
/// Bounds what unauthenticated peers can make a server hold.
pub const AUTH_PENDING_MAX: usize = 64;
/// Bidirectional streams a peer may have open: the handshake stream plus one per endpoint it
/// sends to (a server hosts one endpoint per DP group, a handful per host).
pub const KV_STREAMS_MAX: u32 = 64;
/// A cluster secret shorter than this (16 bytes = 128 bits) is refused.
pub const SECRET_BYTES_MIN: usize = 16;

const AUTH_MAGIC: [u8; 4] = *b"DUKA";
const AUTH_VERSION: u16 = 1;
const NONCE_LEN: usize = 32;
const TAG_LEN: usize = 32;
const EXPORTER_LABEL: &[u8] = b"EXPORTER-duet-kv-auth";
const AUTH_OK: u8 = 1;

const STREAM_MAGIC: [u8; 4] = *b"DUKS";
/// Stream header: magic, version u16, reserved u16, endpoint u32.
const STREAM_HELLO_LEN: usize = 12;
const STREAM_OK: u8 = 0;
const STREAM_UNKNOWN: u8 = 1;
const STREAM_CLOSED: u8 = 2;

/// The cluster credential: a process without it can neither send nor receive KV.
#[derive(Clone)]
pub struct ClusterSecret {
    key: hmac::Key,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    pub fn new(secret: &[u8]) -> Result<Self, TransportError> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(TransportError::Setup(format!(
                "cluster secret of {} bytes is shorter than {SECRET_BYTES_MIN}",
                secret.len()
            )));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    fn tag(&self, role: &[u8], exporter: &[u8], cn: &[u8], sn: &[u8]) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.key);
        for part in [role, exporter, cn, sn] {
            ctx.update(part);
        }
        ctx.sign()
    }

    fn verify(&self, role: &[u8], exporter: &[u8], cn: &[u8], sn: &[u8], tag: &[u8]) -> bool {
        let mut msg = Vec::with_capacity(role.len() + exporter.len() + cn.len() + sn.len());
        for part in [role, exporter, cn, sn] {
            msg.extend_from_slice(part);
        }
        // Constant-time comparison inside ring.
        hmac::verify(&self.key, &msg, tag).is_ok()
    }
}

pub(crate) fn random_nonce() -> Result<[u8; NONCE_LEN], TransportError> {
    let mut n = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut n)
        .map_err(|_| TransportError::Setup("system random source failed".into()))?;
    Ok(n)
}

fn exporter(conn: &Connection) -> Result<[u8; 32], TransportError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| TransportError::Auth("cannot export TLS keying material".into()))?;
    Ok(out)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Keep-alives on KV connections: between two transfers a pair of workers can be quiet for
/// minutes, longer than QUIC's default idle timeout (30 s); without them the next transfer met a
/// connection closed while idle and its sequence was re-run.
const KV_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);

fn transport_config() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(KV_STREAMS_MAX));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(KV_KEEP_ALIVE));
    Arc::new(t)
}

fn server_config() -> Result<quinn::ServerConfig, TransportError> {
    server_config_for(ALPN, transport_config())
}

fn client_config() -> Result<quinn::ClientConfig, TransportError> {
    client_config_for(ALPN, transport_config())
}

pub(crate) fn server_config_for(
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TransportError> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(format!("QUIC server: {e}"));
    let cert =
        rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(|e| setup(&e))?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(&e))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .map_err(|e| setup(&e))?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| setup(&e))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

pub(crate) fn client_config_for(
    alpn: &[u8],
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TransportError> {
    let setup = |e: &dyn std::fmt::Display| TransportError::Setup(format!("QUIC client: {e}"));
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup(&e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider())))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| setup(&e))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport);
    Ok(cfg)
}

/// Accepts any server certificate but still checks the TLS handshake signatures. Who the server
/// is gets established by the cluster-secret handshake, bound to this TLS session by the
/// exporter (module docs), not by a certificate authority.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type InboxMap = Arc<RwLock<BTreeMap<EndpointId, mpsc::Sender<Result<KvFrame, TransportError>>>>>;

/// The receiving side: a QUIC listener hosting KV endpoints.
pub struct QuicKvServer {
    endpoint: Endpoint,
    inboxes: InboxMap,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for QuicKvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicKvServer")
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl QuicKvServer {
    /// Listens on `addr` (port 0 picks one; see [`Self::local_addr`]). Must run inside a tokio
    /// runtime; the accept loop runs until the server is dropped.
    pub fn listen(addr: SocketAddr, secret: ClusterSecret) -> Result<Self, TransportError> {
        let endpoint = Endpoint::server(server_config()?, addr)
            .map_err(|e| TransportError::Setup(format!("QUIC listen on {addr}: {e}")))?;
        let inboxes = InboxMap::default();
        let accept = tokio::spawn(accept_loop(endpoint.clone(), secret, inboxes.clone()));
        Ok(Self {
            endpoint,
            inboxes,
            accept,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint
            .local_addr()
            .map_err(|e| TransportError::Setup(format!("QUIC local address: {e}")))
    }

    /// Binds (or rebinds, after a worker restart) an endpoint; its frames arrive on the inbox.
    pub fn bind(&self, ep: EndpointId) -> KvInbox {
        let (tx, inbox) = KvInbox::channel();
        self.inboxes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep, tx);
        inbox
    }

    pub fn unbind(&self, ep: EndpointId) {
        self.inboxes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ep);
    }
}

impl Drop for QuicKvServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.endpoint.close(CODE_SHUTDOWN, b"server shutting down");
    }
}

async fn accept_loop(endpoint: Endpoint, secret: ClusterSecret, inboxes: InboxMap) {
    let pending = Arc::new(Semaphore::new(AUTH_PENDING_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let secret = secret.clone();
        let inboxes = inboxes.clone();
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(AUTH_TIMEOUT, incoming).await else {
                return;
            };
            match tokio::time::timeout(AUTH_TIMEOUT, server_handshake(&conn, &secret, KV_DOMAIN))
                .await
            {
                Ok(Ok(())) => {}
                _ => {
                    conn.close(CODE_AUTH, b"authentication failed");
                    return;
                }
            }
            drop(permit);
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(serve_stream(send, recv, inboxes.clone()));
            }
        });
    }
}

/// The handshake's domain on the KV data path: tags are over "duet-kv server" / "duet-kv client".
const KV_DOMAIN: &str = "duet-kv";

/// Runs the cluster-secret handshake as the server; `domain` separates the data path's proofs
/// from the control plane's, so a tag from one can never be replayed on the other.
pub(crate) async fn server_handshake(
    conn: &Connection,
    secret: &ClusterSecret,
    domain: &str,
) -> Result<(), TransportError> {
    let (server_role, client_role) = (format!("{domain} server"), format!("{domain} client"));
    let auth = |e: &dyn std::fmt::Display| TransportError::Auth(e.to_string());
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| auth(&e))?;
    let mut hello = [0u8; 8 + NONCE_LEN];
    recv.read_exact(&mut hello).await.map_err(|e| auth(&e))?;
    if hello[0..4] != AUTH_MAGIC || u16::from_le_bytes([hello[4], hello[5]]) != AUTH_VERSION {
        return Err(TransportError::Auth("bad handshake header".into()));
    }
    let cn = &hello[8..];
    let sn = random_nonce()?;
    let ekm = exporter(conn)?;
    let server_tag = secret.tag(server_role.as_bytes(), &ekm, cn, &sn);
    let mut reply = sn.to_vec();
    reply.extend_from_slice(server_tag.as_ref());
    send.write_all(&reply).await.map_err(|e| auth(&e))?;
    let mut client_tag = [0u8; TAG_LEN];
    recv.read_exact(&mut client_tag)
        .await
        .map_err(|e| auth(&e))?;
    if !secret.verify(client_role.as_bytes(), &ekm, cn, &sn, &client_tag) {
        return Err(TransportError::Auth(
            "peer did not prove the cluster secret".into(),
        ));
    }
    send.write_all(&[AUTH_OK]).await.map_err(|e| auth(&e))?;
    Ok(())
}

pub(crate) async fn client_handshake(
    conn: &Connection,
    secret: &ClusterSecret,
    domain: &str,
) -> Result<(), TransportError> {
    let (server_role, client_role) = (format!("{domain} server"), format!("{domain} client"));
    let lost = |e: &dyn std::fmt::Display| TransportError::Auth(format!("handshake: {e}"));
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
    let cn = random_nonce()?;
    let mut hello = AUTH_MAGIC.to_vec();
    hello.extend_from_slice(&AUTH_VERSION.to_le_bytes());
    hello.extend_from_slice(&[0, 0]);
    hello.extend_from_slice(&cn);
    send.write_all(&hello).await.map_err(|e| lost(&e))?;
    let mut reply = [0u8; NONCE_LEN + TAG_LEN];
    recv.read_exact(&mut reply).await.map_err(|e| lost(&e))?;
    let (sn, server_tag) = reply.split_at(NONCE_LEN);
    let ekm = exporter(conn)?;
    if !secret.verify(server_role.as_bytes(), &ekm, &cn, sn, server_tag) {
        conn.close(CODE_AUTH, b"server did not prove the cluster secret");
        return Err(TransportError::Auth(
            "server did not prove the cluster secret".into(),
        ));
    }
    let client_tag = secret.tag(client_role.as_bytes(), &ekm, &cn, sn);
    send.write_all(client_tag.as_ref())
        .await
        .map_err(|e| lost(&e))?;
    let mut ok = [0u8; 1];
    recv.read_exact(&mut ok).await.map_err(|e| lost(&e))?;
    if ok[0] != AUTH_OK {
        return Err(TransportError::Auth("server refused the handshake".into()));
    }
    Ok(())
}

/// One KV stream on the receiving side: stream header, then frames until the sender finishes.
async fn serve_stream(mut send: SendStream, mut recv: RecvStream, inboxes: InboxMap) {
    let mut hello = [0u8; STREAM_HELLO_LEN];
    if recv.read_exact(&mut hello).await.is_err() {
        return;
    }
    if hello[0..4] != STREAM_MAGIC || u16::from_le_bytes([hello[4], hello[5]]) != 1 {
        let _ = recv.stop(CODE_PROTOCOL);
        return;
    }
    let ep = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]);
    let tx = inboxes
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&ep)
        .cloned();
    let status = match &tx {
        None => STREAM_UNKNOWN,
        Some(tx) if tx.is_closed() => STREAM_CLOSED,
        Some(_) => STREAM_OK,
    };
    if send.write_all(&[status]).await.is_err() || status != STREAM_OK {
        let _ = send.finish();
        return;
    }
    let Some(tx) = tx else { return };
    loop {
        // A receiver that goes away stops the stream at once, not only when the next frame
        // arrives, so the sender learns of it within a round trip.
        let read = tokio::select! {
            read = read_frame(&mut recv) => read,
            () = tx.closed() => {
                let _ = recv.stop(CODE_CLOSED);
                return;
            }
        };
        let frame = match read {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(ReadFrameError::Malformed) => {
                let _ = recv.stop(CODE_PROTOCOL);
                return;
            }
            Err(ReadFrameError::Lost) => return,
        };
        // Verification (CRC-32 of every page) runs here, before the frame takes an inbox slot.
        if tx.send(verified(frame)).await.is_err() {
            let _ = recv.stop(CODE_CLOSED);
            return;
        }
    }
}

enum ReadFrameError {
    Malformed,
    Lost,
}

/// Reads one frame; `None` when the stream finished cleanly between frames.
async fn read_frame(recv: &mut RecvStream) -> Result<Option<KvFrame>, ReadFrameError> {
    let mut head = [0u8; HEADER_LEN];
    match recv.read_exact(&mut head).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(ReadFrameError::Malformed),
        Err(quinn::ReadExactError::ReadError(_)) => return Err(ReadFrameError::Lost),
    }
    // Bounds are checked here, before any allocation sized by the peer.
    let header = FrameHeader::decode(&head).map_err(|_| ReadFrameError::Malformed)?;
    let mut index = vec![0u8; header.index_len()];
    let mut bytes = vec![0u8; header.bytes];
    for buf in [&mut index, &mut bytes] {
        match recv.read_exact(buf).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(ReadFrameError::Malformed),
            Err(quinn::ReadExactError::ReadError(_)) => return Err(ReadFrameError::Lost),
        }
    }
    let (pages, page_crc32) =
        wire::decode_index(&header, &index).map_err(|_| ReadFrameError::Malformed)?;
    Ok(Some(KvFrame {
        seq: header.seq,
        layer: header.layer,
        layout: header.layout,
        pages,
        page_crc32,
        bytes,
    }))
}

/// The open stream to one endpoint (its receive half kept so the server's status write and
/// stop signals are not refused).
struct KvStream {
    send: SendStream,
    _recv: RecvStream,
    conn: Connection,
}

/// The sending side: QUIC connections to the servers that host the destination endpoints.
pub struct QuicTransport {
    endpoint: Endpoint,
    client: quinn::ClientConfig,
    secret: ClusterSecret,
    peers: RwLock<BTreeMap<EndpointId, SocketAddr>>,
    conns: tokio::sync::Mutex<BTreeMap<SocketAddr, Connection>>,
    streams: Mutex<BTreeMap<EndpointId, Arc<tokio::sync::Mutex<Option<KvStream>>>>>,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport").finish_non_exhaustive()
    }
}

impl QuicTransport {
    /// A sender bound to an ephemeral local UDP port on `local` (e.g. `0.0.0.0:0`). Must run
    /// inside a tokio runtime.
    pub fn new(local: SocketAddr, secret: ClusterSecret) -> Result<Self, TransportError> {
        let endpoint = Endpoint::client(local)
            .map_err(|e| TransportError::Setup(format!("QUIC client on {local}: {e}")))?;
        Ok(Self {
            endpoint,
            client: client_config()?,
            secret,
            peers: RwLock::default(),
            conns: tokio::sync::Mutex::default(),
            streams: Mutex::default(),
        })
    }

    /// Routes frames for `ep` to the server at `addr`.
    pub fn add_peer(&self, ep: EndpointId, addr: SocketAddr) {
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep, addr);
    }

    pub fn remove_peer(&self, ep: EndpointId) {
        self.peers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ep);
        self.streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ep);
    }

    /// An authenticated connection to `addr`, reused while it lives.
    async fn connection(
        &self,
        dest: EndpointId,
        addr: SocketAddr,
    ) -> Result<Connection, TransportError> {
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            conns.remove(&addr);
        }
        let connect = async {
            let conn = self
                .endpoint
                .connect_with(self.client.clone(), addr, SERVER_NAME)
                .map_err(|e| TransportError::Connect {
                    dest,
                    detail: e.to_string(),
                })?
                .await
                .map_err(|e| TransportError::Connect {
                    dest,
                    detail: e.to_string(),
                })?;
            match client_handshake(&conn, &self.secret, KV_DOMAIN).await {
                Ok(()) => Ok(conn),
                Err(e) => Err(auth_failure(&conn, e)),
            }
        };
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| TransportError::Connect {
                dest,
                detail: format!("no authenticated connection to {addr} within {CONNECT_TIMEOUT:?}"),
            })??;
        conns.insert(addr, conn.clone());
        Ok(conn)
    }

    async fn open_stream(
        &self,
        dest: EndpointId,
        addr: SocketAddr,
    ) -> Result<KvStream, TransportError> {
        let conn = self.connection(dest, addr).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| closed(dest, &e))?;
        let mut hello = STREAM_MAGIC.to_vec();
        hello.extend_from_slice(&1u16.to_le_bytes());
        hello.extend_from_slice(&[0, 0]);
        hello.extend_from_slice(&dest.to_le_bytes());
        send.write_all(&hello)
            .await
            .map_err(|e| write_error(dest, e))?;
        let mut status = [0u8; 1];
        recv.read_exact(&mut status)
            .await
            .map_err(|e| TransportError::Connect {
                dest,
                detail: e.to_string(),
            })?;
        match status[0] {
            STREAM_OK => Ok(KvStream {
                send,
                _recv: recv,
                conn,
            }),
            STREAM_UNKNOWN => Err(TransportError::UnknownEndpoint(dest)),
            STREAM_CLOSED => Err(TransportError::Closed(dest)),
            s => Err(TransportError::Protocol(format!("stream status {s}"))),
        }
    }

    async fn send_frame(&self, dest: EndpointId, frame: KvFrame) -> Result<(), TransportError> {
        let prefix = wire::encode_prefix(&frame)?;
        let addr = self
            .peers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&dest)
            .copied()
            .ok_or(TransportError::UnknownEndpoint(dest))?;
        let slot = self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(dest)
            .or_default()
            .clone();
        // Held for the whole frame: frames to one endpoint never interleave on the stream.
        let mut slot = slot.lock().await;
        // A stream whose connection closed since the last frame (the peer restarted, or the
        // network dropped it) is replaced before any byte of this frame is written: nothing of
        // it can have reached the receiver, so a new connection carries it whole.
        if slot
            .as_ref()
            .is_some_and(|s| s.conn.close_reason().is_some())
        {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.open_stream(dest, addr).await?);
        }
        let Some(stream) = slot.as_mut() else {
            unreachable!("stream opened above")
        };
        // The bytes go to quinn as one chunk without a copy.
        let mut chunks = [Bytes::from(prefix), Bytes::from(frame.bytes)];
        let result = stream.send.write_all_chunks(&mut chunks).await;
        result.map_err(|e| {
            *slot = None;
            write_error(dest, e)
        })
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.endpoint.close(CODE_SHUTDOWN, b"sender shutting down");
    }
}

pub(crate) fn auth_failure(conn: &Connection, e: TransportError) -> TransportError {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == CODE_AUTH => {
            TransportError::Auth("server closed the connection: authentication failed".into())
        }
        _ => e,
    }
}

fn closed(dest: EndpointId, e: &quinn::ConnectionError) -> TransportError {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CODE_AUTH => {
            TransportError::Auth("connection closed: authentication failed".into())
        }
        _ => TransportError::Closed(dest),
    }
}

fn write_error(dest: EndpointId, e: quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::Stopped(code) if code == CODE_PROTOCOL => {
            TransportError::Protocol(format!("endpoint {dest} rejected a malformed frame"))
        }
        quinn::WriteError::ConnectionLost(c) => closed(dest, &c),
        _ => TransportError::Closed(dest),
    }
}

impl KvTransport for QuicTransport {
    fn send(&self, dest: EndpointId, frame: KvFrame) -> SendFuture<'_> {
        Box::pin(self.send_frame(dest, frame))
    }

    fn name(&self) -> &'static str {
        "quic"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KvReceiver;

    fn secret(s: &str) -> ClusterSecret {
        ClusterSecret::new(s.as_bytes()).unwrap()
    }

    const GOOD: &str = "cluster-secret-of-the-test-0001";
    const LOCAL: &str = "127.0.0.1:0";

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            ClusterSecret::new(b"short"),
            Err(TransportError::Setup(_))
        ));
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_and_writes_no_kv() {
        let server = QuicKvServer::listen(LOCAL.parse().unwrap(), secret(GOOD)).unwrap();
        let mut inbox = server.bind(1);
        let rogue =
            QuicTransport::new(LOCAL.parse().unwrap(), secret("not-the-cluster-secret!")).unwrap();
        rogue.add_peer(1, server.local_addr().unwrap());
        let err = rogue
            .send(
                1,
                KvFrame::new(1, 0, crate::test_layout(), vec![0], vec![7; 64]),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Auth(_)), "{err}");
        // A member still gets through, and its frame is the first the endpoint ever sees.
        let member = QuicTransport::new(LOCAL.parse().unwrap(), secret(GOOD)).unwrap();
        member.add_peer(1, server.local_addr().unwrap());
        member
            .send(
                1,
                KvFrame::new(2, 0, crate::test_layout(), vec![0], vec![9; 64]),
            )
            .await
            .unwrap();
        let f = inbox.recv().await.unwrap().unwrap();
        assert_eq!((f.seq, f.bytes[0]), (2, 9));
    }

    /// A peer that skips the handshake and writes a KV stream directly: nothing reaches the
    /// endpoint, and the server closes the connection once the handshake times out or fails.
    #[tokio::test]
    async fn peer_skipping_the_handshake_writes_no_kv() {
        let server = QuicKvServer::listen(LOCAL.parse().unwrap(), secret(GOOD)).unwrap();
        let mut inbox = server.bind(1);
        let client = Endpoint::client(LOCAL.parse().unwrap()).unwrap();
        let conn = client
            .connect_with(
                client_config().unwrap(),
                server.local_addr().unwrap(),
                SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // Its first stream is taken as the handshake stream: a stream header and a frame are
        // not a valid handshake, so the server closes the connection at once.
        let mut bytes = STREAM_MAGIC.to_vec();
        bytes.extend_from_slice(&[1, 0, 0, 0, 1, 0, 0, 0]);
        bytes.extend_from_slice(
            &wire::encode_frame(&KvFrame::new(
                1,
                0,
                crate::test_layout(),
                vec![0],
                vec![1; 64],
            ))
            .unwrap(),
        );
        let _ = send.write_all(&bytes).await;
        let reason = conn.closed().await;
        assert!(
            matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == CODE_AUTH),
            "{reason}"
        );
        drop(server);
        let end = tokio::time::timeout(AUTH_TIMEOUT, inbox.recv()).await;
        assert!(matches!(end, Ok(None)), "no frame may arrive");
    }

    /// A frame past the wire bounds is refused before anything is written.
    #[tokio::test]
    async fn oversized_frame_is_refused_by_the_sender() {
        let t = QuicTransport::new(LOCAL.parse().unwrap(), secret(GOOD)).unwrap();
        let server = QuicKvServer::listen(LOCAL.parse().unwrap(), secret(GOOD)).unwrap();
        let _inbox = server.bind(1);
        t.add_peer(1, server.local_addr().unwrap());
        let pages = vec![0u32; wire::FRAME_PAGES_MAX + 1];
        let frame = KvFrame {
            seq: 1,
            layer: 0,
            layout: crate::test_layout(),
            page_crc32: pages.clone(),
            pages,
            bytes: vec![],
        };
        assert!(matches!(
            t.send(1, frame).await,
            Err(TransportError::Wire(_))
        ));
    }
}
