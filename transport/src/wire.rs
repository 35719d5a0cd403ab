//! The KV frame wire format, shared by the QUIC stream and the UCX completion message.
//!
//! All integers are little-endian. A frame is a fixed header, then an index of one
//! `(page id, CRC-32)` pair per page, then the page bytes:
//!
//! ```text
//! offset size field
//!      0    4 magic      b"DUKV"
//!      4    2 version    WIRE_VERSION (1)
//!      6    2 flags      0 (reserved; a frame with any bit set is rejected)
//!      8    8 seq        sequence (request) id
//!     16    4 layer      model layer
//!     20    4 pages      n, number of pages, <= FRAME_PAGES_MAX
//!     24    8 bytes      length of the page bytes, <= FRAME_BYTES_MAX
//!     32    1 attention  KV layout: 1 MLA latent, 2 GQA k|v (`KvAttention`)
//!     33    1 elem_bytes KV layout: bytes per stored value
//!     34    2 reserved   0
//!     36    4 width      KV layout: values per token and layer
//!     40  8*n index      n x (page id u32, CRC-32 u32)
//! 40+8*n  len bytes      the pages, in index order (absent in a UCX completion message: the
//!                        bytes were written into the receiver's staging slot by RMA)
//! ```
//!
//! Every length is checked against its bound before anything is allocated, and decoding returns
//! a [`WireError`] for any input: it never panics (property-tested below). Whether the bytes hold
//! exactly `pages` equal pages and whether their checksums match is [`KvFrame::verify`]'s job,
//! done by the receiver after decoding, so a corrupt frame is reported against its sequence.

use crate::{KvAttention, KvFrame, KvLayout};

/// `b"DUKV"`: the first four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"DUKV";
/// Bumped on any incompatible change of the layout above (2: the KV layout in the header).
pub const WIRE_VERSION: u16 = 2;
/// Bytes of the fixed frame header.
pub const HEADER_LEN: usize = 40;
/// Bytes of one index entry (page id + CRC-32).
pub const INDEX_ENTRY_LEN: usize = 8;
/// Largest page payload of one frame: 64 MiB. A DeepSeek-V3 layer frame of 64 pages × 64 tokens
/// × 1,152 B (BF16 latent) is 4.5 MiB, so this leaves room for whole long prompts per layer while
/// bounding what one frame makes a receiver allocate.
pub const FRAME_BYTES_MAX: usize = 64 << 20;
/// Most pages in one frame: 65,536 (a 4 M-token prompt in 64-token pages); bounds the index to
/// 512 KiB.
pub const FRAME_PAGES_MAX: usize = 1 << 16;
/// Largest encoded frame: header + full index + full payload.
pub const FRAME_ENCODED_MAX: usize =
    HEADER_LEN + INDEX_ENTRY_LEN * FRAME_PAGES_MAX + FRAME_BYTES_MAX;

/// A malformed or out-of-bounds frame. Wire input that fails any check ends the stream it came on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    #[error("unsupported wire version {0} (this build speaks {WIRE_VERSION})")]
    BadVersion(u16),
    #[error("reserved frame flags set: {0:#06x}")]
    BadFlags(u16),
    #[error("frame of {pages} pages exceeds FRAME_PAGES_MAX ({FRAME_PAGES_MAX})")]
    TooManyPages { pages: u64 },
    #[error("frame of {bytes} bytes exceeds FRAME_BYTES_MAX ({FRAME_BYTES_MAX})")]
    TooLarge { bytes: u64 },
    #[error("unknown KV attention kind {0} (1 MLA, 2 GQA)")]
    BadAttention(u8),
    #[error("reserved KV layout bytes set: {0:#06x}")]
    BadLayoutReserved(u16),
    #[error("frame holds {bytes} bytes but no pages")]
    BytesWithoutPages { bytes: u64 },
    #[error("{what}: need {need} bytes, have {have}")]
    Short {
        what: &'static str,
        need: usize,
        have: usize,
    },
}

/// The fixed part of a frame, validated against every bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub seq: u64,
    pub layer: u32,
    pub layout: KvLayout,
    pub pages: usize,
    pub bytes: usize,
}

impl FrameHeader {
    /// Header of `frame`, or the bound it breaks.
    pub fn of(frame: &KvFrame) -> Result<Self, WireError> {
        check_bounds(frame.pages.len() as u64, frame.bytes.len() as u64)?;
        if frame.page_crc32.len() != frame.pages.len() {
            // A frame built by hand with a mismatched checksum list: send what verify would
            // reject as truncated, never an index the receiver cannot parse.
            return Err(WireError::Short {
                what: "page checksums",
                need: frame.pages.len(),
                have: frame.page_crc32.len(),
            });
        }
        Ok(Self {
            seq: frame.seq,
            layer: frame.layer,
            layout: frame.layout,
            pages: frame.pages.len(),
            bytes: frame.bytes.len(),
        })
    }

    /// Bytes of the index that follows this header.
    pub fn index_len(&self) -> usize {
        self.pages * INDEX_ENTRY_LEN
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC);
        out[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        // 6..8: flags, zero.
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..20].copy_from_slice(&self.layer.to_le_bytes());
        out[20..24].copy_from_slice(&(self.pages as u32).to_le_bytes());
        out[24..32].copy_from_slice(&(self.bytes as u64).to_le_bytes());
        out[32] = self.layout.attention as u8;
        out[33] = self.layout.elem_bytes;
        // 34..36: reserved, zero.
        out[36..40].copy_from_slice(&self.layout.width.to_le_bytes());
        out
    }

    /// Parses and bounds-checks a header from the first [`HEADER_LEN`] bytes of `buf`.
    pub fn decode(buf: &[u8]) -> Result<Self, WireError> {
        let h = buf.get(..HEADER_LEN).ok_or(WireError::Short {
            what: "frame header",
            need: HEADER_LEN,
            have: buf.len(),
        })?;
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != FRAME_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != WIRE_VERSION {
            return Err(WireError::BadVersion(version));
        }
        let flags = u16::from_le_bytes([h[6], h[7]]);
        if flags != 0 {
            return Err(WireError::BadFlags(flags));
        }
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8-byte slice"));
        let layer = u32::from_le_bytes(h[16..20].try_into().expect("4-byte slice"));
        let pages = u32::from_le_bytes(h[20..24].try_into().expect("4-byte slice")) as u64;
        let bytes = u64::from_le_bytes(h[24..32].try_into().expect("8-byte slice"));
        check_bounds(pages, bytes)?;
        let attention = match h[32] {
            1 => KvAttention::Mla,
            2 => KvAttention::Gqa,
            other => return Err(WireError::BadAttention(other)),
        };
        let reserved = u16::from_le_bytes([h[34], h[35]]);
        if reserved != 0 {
            return Err(WireError::BadLayoutReserved(reserved));
        }
        let layout = KvLayout {
            attention,
            elem_bytes: h[33],
            width: u32::from_le_bytes(h[36..40].try_into().expect("4-byte slice")),
        };
        Ok(Self {
            seq,
            layer,
            layout,
            // Both fit: checked against bounds far below usize::MAX above.
            pages: pages as usize,
            bytes: bytes as usize,
        })
    }
}

fn check_bounds(pages: u64, bytes: u64) -> Result<(), WireError> {
    if pages > FRAME_PAGES_MAX as u64 {
        return Err(WireError::TooManyPages { pages });
    }
    if bytes > FRAME_BYTES_MAX as u64 {
        return Err(WireError::TooLarge { bytes });
    }
    if pages == 0 && bytes != 0 {
        return Err(WireError::BytesWithoutPages { bytes });
    }
    Ok(())
}

/// Appends the index (page id, CRC-32 pairs) of `frame` to `out`.
pub fn encode_index(frame: &KvFrame, out: &mut Vec<u8>) {
    out.reserve(frame.pages.len() * INDEX_ENTRY_LEN);
    for (&page, &crc) in frame.pages.iter().zip(&frame.page_crc32) {
        out.extend_from_slice(&page.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
    }
}

/// Header and index of `frame`, ready to precede its bytes on the wire.
pub fn encode_prefix(frame: &KvFrame) -> Result<Vec<u8>, WireError> {
    let header = FrameHeader::of(frame)?;
    let mut out = Vec::with_capacity(HEADER_LEN + header.index_len());
    out.extend_from_slice(&header.encode());
    encode_index(frame, &mut out);
    Ok(out)
}

/// Parses the index of `header` from `buf` into (page ids, checksums).
pub fn decode_index(header: &FrameHeader, buf: &[u8]) -> Result<(Vec<u32>, Vec<u32>), WireError> {
    let need = header.index_len();
    let idx = buf.get(..need).ok_or(WireError::Short {
        what: "frame index",
        need,
        have: buf.len(),
    })?;
    let mut pages = Vec::with_capacity(header.pages);
    let mut crcs = Vec::with_capacity(header.pages);
    for entry in idx.chunks_exact(INDEX_ENTRY_LEN) {
        pages.push(u32::from_le_bytes(
            entry[0..4].try_into().expect("4-byte slice"),
        ));
        crcs.push(u32::from_le_bytes(
            entry[4..8].try_into().expect("4-byte slice"),
        ));
    }
    Ok((pages, crcs))
}

/// A whole frame as one buffer (header, index, bytes). The network paths stream the bytes
/// instead; this is for tests and small messages.
pub fn encode_frame(frame: &KvFrame) -> Result<Vec<u8>, WireError> {
    let mut out = encode_prefix(frame)?;
    out.extend_from_slice(&frame.bytes);
    Ok(out)
}

/// Decodes one whole frame from the front of `buf`; returns it and the bytes it used.
pub fn decode_frame(buf: &[u8]) -> Result<(KvFrame, usize), WireError> {
    let header = FrameHeader::decode(buf)?;
    let rest = &buf[HEADER_LEN..];
    let (pages, page_crc32) = decode_index(&header, rest)?;
    let rest = &rest[header.index_len()..];
    let bytes = rest.get(..header.bytes).ok_or(WireError::Short {
        what: "frame bytes",
        need: header.bytes,
        have: rest.len(),
    })?;
    let used = HEADER_LEN + header.index_len() + header.bytes;
    Ok((
        KvFrame {
            seq: header.seq,
            layer: header.layer,
            layout: header.layout,
            pages,
            page_crc32,
            bytes: bytes.to_vec(),
        },
        used,
    ))
}

/// The page size a received frame claims: its bytes split evenly over its pages (0 for an empty
/// frame). A frame whose bytes do not split evenly fails [`KvFrame::verify`] with this size.
pub fn claimed_page_bytes(frame: &KvFrame) -> usize {
    frame
        .bytes
        .len()
        .checked_div(frame.pages.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GQA: KvLayout = KvLayout {
        attention: KvAttention::Gqa,
        elem_bytes: 2,
        width: 1024,
    };

    fn frame(pages: usize, page_bytes: usize) -> KvFrame {
        let bytes = (0..pages * page_bytes).map(|i| (i * 7) as u8).collect();
        KvFrame::new(42, 3, GQA, (0..pages as u32).rev().collect(), bytes)
    }

    #[test]
    fn round_trip() {
        let f = frame(5, 24);
        let enc = encode_frame(&f).unwrap();
        assert_eq!(enc.len(), HEADER_LEN + 5 * INDEX_ENTRY_LEN + 5 * 24);
        let (g, used) = decode_frame(&enc).unwrap();
        assert_eq!(used, enc.len());
        assert_eq!(
            (g.seq, g.layer, g.layout, &g.pages, &g.page_crc32, &g.bytes),
            (f.seq, f.layer, GQA, &f.pages, &f.page_crc32, &f.bytes)
        );
        g.verify(claimed_page_bytes(&g)).unwrap();
    }

    #[test]
    fn oversize_lengths_are_rejected_before_allocation() {
        let mut h = FrameHeader {
            seq: 1,
            layer: 0,
            layout: GQA,
            pages: 1,
            bytes: 8,
        }
        .encode();
        h[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            FrameHeader::decode(&h),
            Err(WireError::TooLarge { bytes: u64::MAX })
        );
        h[24..32].copy_from_slice(&8u64.to_le_bytes());
        h[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            FrameHeader::decode(&h),
            Err(WireError::TooManyPages {
                pages: u32::MAX as u64
            })
        );
        h[20..24].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            FrameHeader::decode(&h),
            Err(WireError::BytesWithoutPages { bytes: 8 })
        );
    }

    #[test]
    fn bad_magic_version_flags() {
        let good = FrameHeader {
            seq: 1,
            layer: 0,
            layout: GQA,
            pages: 1,
            bytes: 8,
        }
        .encode();
        let mut h = good;
        h[0] = b'X';
        assert!(matches!(
            FrameHeader::decode(&h),
            Err(WireError::BadMagic(_))
        ));
        let mut h = good;
        h[4] = 9;
        assert_eq!(FrameHeader::decode(&h), Err(WireError::BadVersion(9)));
        let mut h = good;
        h[7] = 1;
        assert_eq!(FrameHeader::decode(&h), Err(WireError::BadFlags(0x100)));
        let mut h = good;
        h[32] = 3;
        assert_eq!(FrameHeader::decode(&h), Err(WireError::BadAttention(3)));
        let mut h = good;
        h[35] = 1;
        assert_eq!(
            FrameHeader::decode(&h),
            Err(WireError::BadLayoutReserved(0x100))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Arbitrary bytes decode to a frame or an error, never a panic, and a decoded frame
        /// never claims more than the buffer held.
        #[test]
        fn garbage_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok((f, used)) = decode_frame(&buf) {
                prop_assert!(used <= buf.len());
                prop_assert_eq!(f.pages.len(), f.page_crc32.len());
            }
        }

        /// Garbage after a valid magic and version exercises the length checks.
        #[test]
        fn garbage_after_valid_prefix_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = FRAME_MAGIC.to_vec();
            buf.extend_from_slice(&WIRE_VERSION.to_le_bytes());
            buf.extend_from_slice(&[0, 0]);
            buf.extend_from_slice(&tail);
            if let Ok((_, used)) = decode_frame(&buf) {
                prop_assert!(used <= buf.len());
            }
        }

        /// Any single-byte change or truncation of a valid encoding decodes to an error, to a
        /// frame that fails verification, or to the frame itself (a change in the checksummed
        /// bytes is caught by verify) — never a panic.
        #[test]
        fn mutated_frames_never_panic(pages in 0usize..6, page_bytes in 1usize..40,
                                      at in any::<prop::sample::Index>(), xor in 1u8..=255,
                                      cut in any::<prop::sample::Index>()) {
            let f = frame(pages, page_bytes);
            let mut enc = encode_frame(&f).unwrap();
            let i = at.index(enc.len());
            enc[i] ^= xor;
            let n = cut.index(enc.len() + 1);
            for buf in [&enc[..], &enc[..n]] {
                if let Ok((g, used)) = decode_frame(buf) {
                    prop_assert!(used <= buf.len());
                    let _ = g.verify(claimed_page_bytes(&g));
                }
            }
        }

        #[test]
        fn round_trips(pages in 0usize..8, page_bytes in 1usize..64, seq in any::<u64>(), layer in any::<u32>()) {
            let mut f = frame(pages, page_bytes);
            f.seq = seq;
            f.layer = layer;
            let enc = encode_frame(&f).unwrap();
            let (g, used) = decode_frame(&enc).unwrap();
            prop_assert_eq!(used, enc.len());
            prop_assert_eq!(g.bytes, f.bytes);
            prop_assert_eq!(g.layout, f.layout);
            prop_assert_eq!(g.pages, f.pages);
            prop_assert_eq!(g.page_crc32, f.page_crc32);
        }
    }
}
