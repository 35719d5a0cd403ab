//! KV page transfer between prefill and decode workers (DESIGN.md, "One request, end to end").
//!
//! The protocol: the decode worker reserves pages for a prompt and hands the prefill worker their
//! ids; the prefill worker sends each layer's KV for those pages as one [`KvFrame`] as soon
//! as the layer is computed, then a completion record (over the control plane, not here) that
//! names how many layers to expect. The decode worker admits the sequence only once every layer
//! arrived and verified, so a truncated or corrupt transfer is never decoded from.
//!
//! [`KvTransport`] is the one interface every implementation provides, and [`KvReceiver`] the one
//! receiving side. [`InProcTransport`] moves the bytes between actors of one process through
//! bounded channels; [`quic::QuicTransport`] streams them over QUIC (the multi-host fallback, with
//! a cluster-secret handshake); `ucx::UcxTransport` (feature `ucx`) writes them with RMA into the
//! receiver's registered staging memory. All three pass one test suite (`tests/suite.rs`); the
//! wire format and protocols are in `README.md` beside this crate.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;

pub mod a2a;
pub mod control;
pub mod quic;
#[cfg(feature = "ucx")]
pub mod ucx;
pub mod wire;

pub use wire::WireError;

/// A decode worker's KV endpoint (its group id).
pub type EndpointId = u32;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TransportError {
    #[error("no KV endpoint {0} is bound")]
    UnknownEndpoint(EndpointId),
    #[error("KV endpoint {0} closed")]
    Closed(EndpointId),
    #[error(
        "sequence {seq} layer {layer}: frame of {bytes} bytes does not hold {pages} pages of {page_bytes}"
    )]
    Truncated {
        seq: u64,
        layer: u32,
        bytes: usize,
        pages: usize,
        page_bytes: usize,
    },
    #[error("sequence {seq} layer {layer}: checksum mismatch on page {page}")]
    Corrupt { seq: u64, layer: u32, page: u32 },
    #[error(
        "sequence {seq} layer {layer}: KV of another layout ({got}) than this worker's ({expected}): another model or dtype"
    )]
    Layout {
        seq: u64,
        layer: u32,
        got: KvLayout,
        expected: KvLayout,
    },
    #[error("malformed KV frame: {0}")]
    Wire(#[from] WireError),
    #[error("frame of {bytes} bytes exceeds this transport's limit of {max}")]
    FrameTooLarge { bytes: usize, max: usize },
    #[error("cannot reach KV endpoint {dest}: {detail}")]
    Connect { dest: EndpointId, detail: String },
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("KV protocol violation: {0}")]
    Protocol(String),
    #[error("transport setup failed: {0}")]
    Setup(String),
}

/// What the KV cache stores per token and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum KvAttention {
    /// DeepSeek's MLA: the latent `[c_kv | k_pe]`.
    Mla = 1,
    /// Grouped-query attention (Qwen2, Llama): `[k | v]` of the KV heads.
    Gqa = 2,
}

/// The layout of a KV page, carried in every frame: a receiver writes only pages of its own
/// layout into its pool, so KV from a worker running another model (another attention, width or
/// dtype) is refused rather than decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub attention: KvAttention,
    /// Bytes of one stored value (2 for BF16, 4 for F32).
    pub elem_bytes: u8,
    /// Values per token and layer (576 for DeepSeek-V3's latent; `2 · kv_heads · head_dim` for
    /// GQA).
    pub width: u32,
}

impl std::fmt::Display for KvLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.attention {
            KvAttention::Mla => "MLA latent",
            KvAttention::Gqa => "GQA k|v",
        };
        write!(
            f,
            "{kind}, {} × {} B per token",
            self.width, self.elem_bytes
        )
    }
}

/// One layer's KV for some pages of one sequence.
#[derive(Debug, Clone)]
pub struct KvFrame {
    pub seq: u64,
    pub layer: u32,
    pub layout: KvLayout,
    /// Destination page ids in the receiver's pool, in the order of `bytes`.
    pub pages: Vec<u32>,
    /// CRC-32 of each page's bytes, computed by the sender (crc32fast: IEEE polynomial).
    pub page_crc32: Vec<u32>,
    pub bytes: Vec<u8>,
}

impl KvFrame {
    /// A frame for `pages` of `layout`, checksumming each page of `bytes`.
    pub fn new(seq: u64, layer: u32, layout: KvLayout, pages: Vec<u32>, bytes: Vec<u8>) -> Self {
        let page_bytes = if pages.is_empty() {
            0
        } else {
            bytes.len() / pages.len()
        };
        let page_crc32 = if page_bytes == 0 {
            vec![0; pages.len()]
        } else {
            bytes.chunks(page_bytes).map(crc32fast::hash).collect()
        };
        Self {
            seq,
            layer,
            layout,
            pages,
            page_crc32,
            bytes,
        }
    }

    /// Checks the frame's pages are of the receiver's layout.
    pub fn check_layout(&self, expected: &KvLayout) -> Result<(), TransportError> {
        if self.layout != *expected {
            return Err(TransportError::Layout {
                seq: self.seq,
                layer: self.layer,
                got: self.layout,
                expected: *expected,
            });
        }
        Ok(())
    }

    /// Checks the frame holds exactly its pages and every page's checksum matches.
    pub fn verify(&self, page_bytes: usize) -> Result<(), TransportError> {
        if self.bytes.len() != self.pages.len() * page_bytes
            || self.page_crc32.len() != self.pages.len()
        {
            return Err(TransportError::Truncated {
                seq: self.seq,
                layer: self.layer,
                bytes: self.bytes.len(),
                pages: self.pages.len(),
                page_bytes,
            });
        }
        for (i, (&page, &crc)) in self.pages.iter().zip(&self.page_crc32).enumerate() {
            let chunk = &self.bytes[i * page_bytes..(i + 1) * page_bytes];
            if crc32fast::hash(chunk) != crc {
                return Err(TransportError::Corrupt {
                    seq: self.seq,
                    layer: self.layer,
                    page,
                });
            }
        }
        Ok(())
    }
}

pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), TransportError>> + Send + 'a>>;

/// Moves KV frames to a decode worker's endpoint. Delivery is in order per (sender, endpoint);
/// `send` resolves once the frame is handed to the receiver (in-process) or written and flushed
/// (network transports), and applies back-pressure when the receiver is behind.
pub trait KvTransport: Send + Sync + 'static {
    fn send(&self, dest: EndpointId, frame: KvFrame) -> SendFuture<'_>;
    /// A short name for logs and metrics ("inproc", "ucx", "quic").
    fn name(&self) -> &'static str;
}

/// Frames a receiving endpoint may have queued before senders wait: one layer of a request per
/// frame, so 256 frames is four 61-layer prompts in flight per decode group.
pub const INPROC_FRAMES_MAX: usize = 256;

/// The one-process transport: each decode endpoint is a bounded channel.
#[derive(Clone, Default)]
pub struct InProcTransport {
    endpoints: Arc<RwLock<BTreeMap<EndpointId, mpsc::Sender<KvFrame>>>>,
}

impl std::fmt::Debug for InProcTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcTransport").finish_non_exhaustive()
    }
}

impl InProcTransport {
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds (or rebinds, after a worker restart) an endpoint; frames for it arrive on the
    /// returned receiver.
    pub fn bind(&self, ep: EndpointId) -> mpsc::Receiver<KvFrame> {
        let (tx, rx) = mpsc::channel(INPROC_FRAMES_MAX);
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ep, tx);
        rx
    }

    pub fn unbind(&self, ep: EndpointId) {
        self.endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ep);
    }
}

impl KvTransport for InProcTransport {
    fn send(&self, dest: EndpointId, frame: KvFrame) -> SendFuture<'_> {
        let tx = self
            .endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&dest)
            .cloned();
        Box::pin(async move {
            let tx = tx.ok_or(TransportError::UnknownEndpoint(dest))?;
            tx.send(frame)
                .await
                .map_err(|_| TransportError::Closed(dest))
        })
    }

    fn name(&self) -> &'static str {
        "inproc"
    }
}

/// The receiving side of a KV endpoint, common to every transport.
///
/// `recv` yields the next frame in send order: `Ok` once it verified (every page's CRC-32), `Err`
/// for a frame that arrived but failed verification (so the decode worker can fail exactly that
/// sequence), and `None` once no sender can reach the endpoint any more.
pub trait KvReceiver: Send {
    fn recv(&mut self) -> impl Future<Output = Option<Result<KvFrame, TransportError>>> + Send;
}

/// The in-process endpoint: frames travel as they are, verified on receipt.
impl KvReceiver for mpsc::Receiver<KvFrame> {
    async fn recv(&mut self) -> Option<Result<KvFrame, TransportError>> {
        let frame = mpsc::Receiver::recv(self).await?;
        Some(verified(frame))
    }
}

/// `frame` if its bytes split into its pages and every page's checksum matches.
pub(crate) fn verified(frame: KvFrame) -> Result<KvFrame, TransportError> {
    frame.verify(wire::claimed_page_bytes(&frame))?;
    Ok(frame)
}

/// Frames a network endpoint may hold verified but not yet taken by its decode worker, before
/// the transport stops reading and back-pressure reaches the sender: 64 layer frames, about one
/// 61-layer prompt (≈ 290 MB at 4,096 tokens in BF16).
pub const NET_INBOX_FRAMES_MAX: usize = 64;

/// The receiving end of a network KV endpoint (QUIC or UCX): verified frames, or the error a
/// frame failed verification with, in arrival order.
#[derive(Debug)]
pub struct KvInbox {
    rx: mpsc::Receiver<Result<KvFrame, TransportError>>,
}

impl KvInbox {
    pub(crate) fn channel() -> (mpsc::Sender<Result<KvFrame, TransportError>>, Self) {
        let (tx, rx) = mpsc::channel(NET_INBOX_FRAMES_MAX);
        (tx, Self { rx })
    }
}

impl KvReceiver for KvInbox {
    async fn recv(&mut self) -> Option<Result<KvFrame, TransportError>> {
        self.rx.recv().await
    }
}

/// A DeepSeek-V3 BF16 layout for the crate's unit tests.
#[cfg(test)]
pub(crate) fn test_layout() -> KvLayout {
    KvLayout {
        attention: KvAttention::Mla,
        elem_bytes: 2,
        width: 576,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MLA: KvLayout = KvLayout {
        attention: KvAttention::Mla,
        elem_bytes: 2,
        width: 576,
    };

    fn frame() -> KvFrame {
        let bytes: Vec<u8> = (0..3 * 16).map(|i| i as u8).collect();
        KvFrame::new(7, 2, MLA, vec![4, 9, 1], bytes)
    }

    #[test]
    fn a_frame_of_another_layout_is_refused() {
        let f = frame();
        assert_eq!(f.check_layout(&MLA), Ok(()));
        for other in [
            KvLayout {
                attention: KvAttention::Gqa,
                ..MLA
            },
            KvLayout {
                elem_bytes: 4,
                ..MLA
            },
            KvLayout { width: 512, ..MLA },
        ] {
            let e = f.check_layout(&other).unwrap_err();
            assert_eq!(
                e,
                TransportError::Layout {
                    seq: 7,
                    layer: 2,
                    got: MLA,
                    expected: other
                }
            );
            assert!(e.to_string().contains("another layout"), "{e}");
        }
    }

    #[test]
    fn intact_frame_verifies() {
        assert_eq!(frame().verify(16), Ok(()));
    }

    #[test]
    fn flipped_byte_names_its_page() {
        let mut f = frame();
        f.bytes[20] ^= 1;
        assert_eq!(
            f.verify(16),
            Err(TransportError::Corrupt {
                seq: 7,
                layer: 2,
                page: 9
            })
        );
    }

    #[test]
    fn truncated_frame_is_detected() {
        let mut f = frame();
        f.bytes.truncate(40);
        assert!(matches!(
            f.verify(16),
            Err(TransportError::Truncated { .. })
        ));
    }

    #[tokio::test]
    async fn inproc_delivers_in_order_and_reports_closed_endpoints() {
        let t = InProcTransport::new();
        let mut rx = t.bind(3);
        for layer in 0..5 {
            t.send(
                3,
                KvFrame::new(1, layer, MLA, vec![0], vec![layer as u8; 8]),
            )
            .await
            .unwrap();
        }
        for layer in 0..5 {
            let f = rx.recv().await.unwrap();
            assert_eq!((f.layer, f.bytes[0]), (layer, layer as u8));
            f.verify(8).unwrap();
        }
        assert_eq!(
            t.send(4, frame()).await,
            Err(TransportError::UnknownEndpoint(4))
        );
        drop(rx);
        assert_eq!(t.send(3, frame()).await, Err(TransportError::Closed(3)));
    }
}
