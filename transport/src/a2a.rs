//! The all-to-all of expert parallelism: in every MoE layer each rank of an EP group sends every
//! rank (itself included) one block of rows — the hidden states dispatched to the experts that
//! rank holds, or the expert outputs combined back — and receives one block from each.
//!
//! [`AllToAll::exchange`] is one such round. Rounds are lock-step ([`duet_core::ep::Exchange`]
//! keeps the books): a rank with no rows still sends an empty block, a rank may run at most one
//! round ahead of the slowest (its blocks wait for the round), and a rank that sends nothing for
//! [`A2A_WAIT`] fails the round with the ranks it waited for, never a hang. A block carries its
//! rows' routing metadata (`meta`, opaque here: which token and choice each row is) beside the
//! row bytes; the transport never looks inside either.
//!
//! [`InProcA2a`] connects the ranks of one process through bounded channels; [`QuicA2a`] connects
//! ranks in different processes or hosts over QUIC with the cluster-secret handshake (one
//! unidirectional stream per block). Both pass one suite (`tests/a2a_suite.rs`). An NCCL or UCX
//! implementation fits the same trait: blocks are whole byte buffers, received in sender order.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use duet_core::ep::{EpError, Exchange, RoundState};
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::{Mutex, mpsc};

use crate::TransportError;
use crate::quic::{
    AUTH_TIMEOUT, CONNECT_TIMEOUT, ClusterSecret, client_config_for, client_handshake,
    server_config_for, server_handshake,
};

/// How long a round waits for the slowest rank before it fails.
pub const A2A_WAIT: Duration = Duration::from_secs(10);
/// Rounds a rank's inbox holds per sender: the current one and one early (lock-step allows no
/// more), so a fast rank cannot queue without bound at a slow one.
pub const A2A_ROUNDS_IN_FLIGHT: usize = 2;
/// The largest block a rank accepts: a DeepSeek-V3 rank dispatching 256 tokens × top-8 × 7,168
/// BF16 values to one rank is 29 MB; this leaves room for 4× that and refuses garbage lengths
/// before allocating.
pub const A2A_BLOCK_BYTES_MAX: usize = 128 << 20;
/// Metadata words per block, likewise bounded.
pub const A2A_META_WORDS_MAX: usize = 1 << 20;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum A2aError {
    #[error(transparent)]
    Round(#[from] EpError),
    #[error("exchange needs one block per rank: {got} for {ranks} ranks")]
    Blocks { got: usize, ranks: usize },
    #[error("block of {bytes} bytes / {meta} metadata words exceeds the limit")]
    TooLarge { bytes: usize, meta: usize },
    #[error("rank {0} is unreachable: {1}")]
    Unreachable(usize, String),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

pub use duet_core::ep::RowBlock;

fn check_block(b: &RowBlock) -> Result<(), A2aError> {
    if b.data.len() > A2A_BLOCK_BYTES_MAX || b.meta.len() > A2A_META_WORDS_MAX {
        return Err(A2aError::TooLarge {
            bytes: b.data.len(),
            meta: b.meta.len(),
        });
    }
    Ok(())
}

pub type ExchangeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<RowBlock>, A2aError>> + Send + 'a>>;

/// One rank's end of an EP group's all-to-all.
pub trait AllToAll: Send + Sync {
    fn rank(&self) -> usize;
    fn ranks(&self) -> usize;
    /// Round `round`: sends `blocks[r]` to rank `r` for every rank, and returns the block each
    /// rank sent this one, indexed by sender. Rounds are 0, 1, 2, … with no gaps.
    fn exchange(&self, round: u64, blocks: Vec<RowBlock>) -> ExchangeFuture<'_>;
}

/// A block as it arrives: sender, round, rows.
type Arrival = (usize, u64, RowBlock);

/// The receiving half every implementation shares: the lock-step books and the blocks that
/// arrived for the current and the next round.
struct Inbox {
    rx: mpsc::Receiver<Arrival>,
    exchange: Exchange,
    held: BTreeMap<(u64, usize), RowBlock>,
    /// How long a round waits for the slowest rank ([`A2A_WAIT`] unless set).
    wait: Duration,
}

impl Inbox {
    fn new(rx: mpsc::Receiver<Arrival>, ranks: usize) -> Result<Self, A2aError> {
        Ok(Self {
            rx,
            exchange: Exchange::new(ranks)?,
            held: BTreeMap::new(),
            wait: A2A_WAIT,
        })
    }

    /// Refuses a round other than the open one before anything is sent for it.
    fn expect_round(&self, round: u64) -> Result<(), A2aError> {
        if round != self.exchange.round() {
            return Err(EpError::WrongRound {
                from: usize::MAX,
                got: round,
                want: self.exchange.round(),
            }
            .into());
        }
        Ok(())
    }

    /// Waits until round `round` (checked by [`Inbox::expect_round`] before anything was sent)
    /// has a block from every rank, or fails it.
    async fn collect(
        &mut self,
        clock: &tokio::time::Instant,
        round: u64,
        ranks: usize,
    ) -> Result<Vec<RowBlock>, A2aError> {
        let now = || u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.exchange.open(now(), self.wait.as_micros() as u64);
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            match self.exchange.poll(now())? {
                RoundState::Complete => break,
                RoundState::Waiting { missing } => {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some((from, r, block))) => {
                            self.exchange.handle_block(from, r)?;
                            self.held.insert((r, from), block);
                        }
                        Ok(None) => {
                            return Err(A2aError::Unreachable(
                                missing[0],
                                "every connection to the group closed".into(),
                            ));
                        }
                        // The next poll reports the timeout with the ranks still missing.
                        Err(_) => {}
                    }
                }
            }
        }
        self.exchange.advance()?;
        Ok((0..ranks)
            .map(|from| self.held.remove(&(round, from)).unwrap_or_default())
            .collect())
    }
}

fn check_blocks(blocks: &[RowBlock], ranks: usize) -> Result<(), A2aError> {
    if blocks.len() != ranks {
        return Err(A2aError::Blocks {
            got: blocks.len(),
            ranks,
        });
    }
    blocks.iter().try_for_each(check_block)
}

/// The ranks of one process, connected by bounded channels.
pub struct InProcA2a {
    rank: usize,
    to: Vec<mpsc::Sender<Arrival>>,
    inbox: Mutex<Inbox>,
    clock: tokio::time::Instant,
}

impl InProcA2a {
    /// An EP group of `ranks` ranks; element `r` is rank `r`'s end.
    pub fn group(ranks: usize) -> Result<Vec<InProcA2a>, A2aError> {
        let mut txs = Vec::with_capacity(ranks);
        let mut rxs = Vec::with_capacity(ranks);
        for _ in 0..ranks {
            let (tx, rx) = mpsc::channel(A2A_ROUNDS_IN_FLIGHT * ranks.max(1));
            txs.push(tx);
            rxs.push(rx);
        }
        let clock = tokio::time::Instant::now();
        rxs.into_iter()
            .enumerate()
            .map(|(rank, rx)| {
                Ok(InProcA2a {
                    rank,
                    to: txs.clone(),
                    inbox: Mutex::new(Inbox::new(rx, ranks)?),
                    clock,
                })
            })
            .collect()
    }
}

impl InProcA2a {
    /// How long a round waits for the slowest rank before it fails (default [`A2A_WAIT`]).
    pub async fn set_wait(&self, wait: Duration) {
        self.inbox.lock().await.wait = wait;
    }
}

impl AllToAll for InProcA2a {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.to.len()
    }

    fn exchange(&self, round: u64, blocks: Vec<RowBlock>) -> ExchangeFuture<'_> {
        Box::pin(async move {
            check_blocks(&blocks, self.ranks())?;
            let mut inbox = self.inbox.lock().await;
            inbox.expect_round(round)?;
            for (dest, block) in blocks.into_iter().enumerate() {
                // A full channel means the destination is a round behind: wait for it, bounded
                // by the round's own deadline.
                let sent =
                    tokio::time::timeout(A2A_WAIT, self.to[dest].send((self.rank, round, block)))
                        .await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        return Err(A2aError::Unreachable(dest, "its end was dropped".into()));
                    }
                    Err(_) => {
                        return Err(A2aError::Unreachable(
                            dest,
                            format!("it took no block for {A2A_WAIT:?}"),
                        ));
                    }
                }
            }
            inbox.collect(&self.clock, round, self.ranks()).await
        })
    }
}

const ALPN: &[u8] = b"duet-a2a/1";
const DOMAIN: &str = "duet-a2a";
const SERVER_NAME: &str = "duet-a2a";
const BLOCK_MAGIC: [u8; 4] = *b"DUA2";
/// Block header: magic, from u32, round u64, meta words u32, data bytes u64.
const HEADER_LEN: usize = 4 + 4 + 8 + 4 + 8;
/// Blocks of one round and the next in flight from each peer, as streams.
const STREAMS_PER_PEER: u32 = 2 * A2A_ROUNDS_IN_FLIGHT as u32;

fn a2a_transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // The handshake stream, then one uni stream per block.
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.max_concurrent_uni_streams(VarInt::from_u32(STREAMS_PER_PEER));
    t.keep_alive_interval(Some(Duration::from_millis(250)));
    t.max_idle_timeout(Some(
        Duration::from_secs(2)
            .try_into()
            .expect("2 s fits QUIC's idle timeout"),
    ));
    Arc::new(t)
}

/// Ranks in different processes or hosts, over QUIC. Every rank listens; rank `a` sends to rank
/// `b` over the connection `a` opened to `b`.
pub struct QuicA2a {
    rank: usize,
    ranks: usize,
    endpoint: Endpoint,
    secret: ClusterSecret,
    /// Outgoing connections, by destination; `None` for this rank itself.
    peers: Mutex<Vec<Option<Connection>>>,
    self_tx: mpsc::Sender<Arrival>,
    inbox: Mutex<Inbox>,
    clock: tokio::time::Instant,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for QuicA2a {
    fn drop(&mut self) {
        self.accept.abort();
        self.endpoint.close(VarInt::from_u32(0), b"rank leaving");
    }
}

impl QuicA2a {
    /// Rank `rank` of `ranks`, listening on `addr` for the others' blocks. Call
    /// [`QuicA2a::connect`] with every rank's address before the first round.
    pub fn bind(
        rank: usize,
        ranks: usize,
        addr: SocketAddr,
        secret: ClusterSecret,
    ) -> Result<Self, A2aError> {
        if rank >= ranks {
            return Err(EpError::UnknownRank { rank, ranks }.into());
        }
        let endpoint = Endpoint::server(server_config_for(ALPN, a2a_transport())?, addr)
            .map_err(|e| TransportError::Setup(format!("all-to-all listen on {addr}: {e}")))?;
        let (tx, rx) = mpsc::channel(A2A_ROUNDS_IN_FLIGHT * ranks);
        let accept = tokio::spawn(accept_loop(
            endpoint.clone(),
            secret.clone(),
            ranks,
            tx.clone(),
        ));
        Ok(Self {
            rank,
            ranks,
            endpoint,
            secret,
            peers: Mutex::new(vec![None; ranks]),
            self_tx: tx,
            inbox: Mutex::new(Inbox::new(rx, ranks)?),
            clock: tokio::time::Instant::now(),
            accept,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, A2aError> {
        Ok(self
            .endpoint
            .local_addr()
            .map_err(|e| TransportError::Setup(format!("all-to-all local address: {e}")))?)
    }

    /// Connects to every other rank (`addrs[r]` is rank `r`'s listening address) and proves the
    /// cluster secret to each.
    pub async fn connect(&self, addrs: &[SocketAddr]) -> Result<(), A2aError> {
        if addrs.len() != self.ranks {
            return Err(EpError::Shape(format!(
                "{} addresses for a group of {} ranks",
                addrs.len(),
                self.ranks
            ))
            .into());
        }
        let cfg = client_config_for(ALPN, a2a_transport())?;
        let mut peers = self.peers.lock().await;
        for (r, &addr) in addrs.iter().enumerate() {
            if r == self.rank {
                continue;
            }
            let unreachable = |e: &dyn std::fmt::Display| A2aError::Unreachable(r, e.to_string());
            let setup = async {
                let conn = self
                    .endpoint
                    .connect_with(cfg.clone(), addr, SERVER_NAME)
                    .map_err(|e| unreachable(&e))?
                    .await
                    .map_err(|e| unreachable(&e))?;
                client_handshake(&conn, &self.secret, DOMAIN).await?;
                Ok::<_, A2aError>(conn)
            };
            let conn = tokio::time::timeout(CONNECT_TIMEOUT, setup)
                .await
                .map_err(|_| unreachable(&format!("no answer within {CONNECT_TIMEOUT:?}")))??;
            peers[r] = Some(conn);
        }
        Ok(())
    }
}

impl QuicA2a {
    /// How long a round waits for the slowest rank before it fails (default [`A2A_WAIT`]).
    pub async fn set_wait(&self, wait: Duration) {
        self.inbox.lock().await.wait = wait;
    }
}

impl AllToAll for QuicA2a {
    fn rank(&self) -> usize {
        self.rank
    }

    fn ranks(&self) -> usize {
        self.ranks
    }

    fn exchange(&self, round: u64, blocks: Vec<RowBlock>) -> ExchangeFuture<'_> {
        Box::pin(async move {
            check_blocks(&blocks, self.ranks)?;
            let mut inbox = self.inbox.lock().await;
            inbox.expect_round(round)?;
            let peers = self.peers.lock().await.clone();
            let sends = blocks.into_iter().enumerate().map(|(dest, block)| {
                let conn = peers[dest].clone();
                let me = self.rank;
                let self_tx = self.self_tx.clone();
                async move {
                    match conn {
                        None if dest == me => self_tx
                            .send((me, round, block))
                            .await
                            .map_err(|_| A2aError::Unreachable(me, "inbox closed".into())),
                        None => Err(A2aError::Unreachable(dest, "not connected".into())),
                        Some(c) => {
                            let sent =
                                tokio::time::timeout(A2A_WAIT, send_block(&c, me, round, &block))
                                    .await;
                            match sent {
                                Ok(r) => r.map_err(|e| A2aError::Unreachable(dest, e)),
                                Err(_) => Err(A2aError::Unreachable(
                                    dest,
                                    format!("it took no block for {A2A_WAIT:?}"),
                                )),
                            }
                        }
                    }
                }
            });
            // Concurrently: a slow peer does not hold back the others' blocks.
            for r in futures::future::join_all(sends).await {
                r?;
            }
            inbox.collect(&self.clock, round, self.ranks).await
        })
    }
}

async fn send_block(c: &Connection, from: usize, round: u64, b: &RowBlock) -> Result<(), String> {
    let mut s = c.open_uni().await.map_err(|e| e.to_string())?;
    let mut head = Vec::with_capacity(HEADER_LEN + 4 * b.meta.len());
    head.extend_from_slice(&BLOCK_MAGIC);
    head.extend_from_slice(&(from as u32).to_le_bytes());
    head.extend_from_slice(&round.to_le_bytes());
    head.extend_from_slice(&(b.meta.len() as u32).to_le_bytes());
    head.extend_from_slice(&(b.data.len() as u64).to_le_bytes());
    for w in &b.meta {
        head.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&head).await.map_err(|e| e.to_string())?;
    s.write_all(&b.data).await.map_err(|e| e.to_string())?;
    s.finish().map_err(|e| e.to_string())?;
    Ok(())
}

async fn accept_loop(
    endpoint: Endpoint,
    secret: ClusterSecret,
    ranks: usize,
    out: mpsc::Sender<Arrival>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let (secret, out) = (secret.clone(), out.clone());
        tokio::spawn(async move {
            let Ok(Ok(conn)) = tokio::time::timeout(AUTH_TIMEOUT, incoming).await else {
                return;
            };
            let auth = tokio::time::timeout(AUTH_TIMEOUT, server_handshake(&conn, &secret, DOMAIN));
            if !matches!(auth.await, Ok(Ok(()))) {
                tracing::warn!(
                    "all-to-all peer {} failed the cluster-secret handshake",
                    conn.remote_address()
                );
                conn.close(crate::quic::CODE_AUTH, b"authentication failed");
                return;
            }
            while let Ok(mut s) = conn.accept_uni().await {
                match read_block(&mut s, ranks).await {
                    Ok(a) => {
                        if out.send(a).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!("all-to-all peer {}: {e}", conn.remote_address());
                        conn.close(VarInt::from_u32(1), b"malformed block");
                        return;
                    }
                }
            }
        });
    }
}

async fn read_block(s: &mut quinn::RecvStream, ranks: usize) -> Result<Arrival, String> {
    let mut head = [0u8; HEADER_LEN];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    if head[0..4] != BLOCK_MAGIC {
        return Err("bad block magic".into());
    }
    let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(head[i..i + 8].try_into().expect("8 bytes"));
    let from = u32_at(4) as usize;
    let round = u64_at(8);
    let meta_words = u32_at(16) as usize;
    let bytes = usize::try_from(u64_at(20)).unwrap_or(usize::MAX);
    if from >= ranks || meta_words > A2A_META_WORDS_MAX || bytes > A2A_BLOCK_BYTES_MAX {
        return Err(format!(
            "block header out of range: rank {from} of {ranks}, {meta_words} words, {bytes} bytes"
        ));
    }
    let mut meta_bytes = vec![0u8; 4 * meta_words];
    s.read_exact(&mut meta_bytes)
        .await
        .map_err(|e| e.to_string())?;
    let mut data = vec![0u8; bytes];
    s.read_exact(&mut data).await.map_err(|e| e.to_string())?;
    let meta = meta_bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok((from, round, RowBlock { meta, data }))
}
