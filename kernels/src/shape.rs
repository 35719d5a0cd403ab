//! The shapes ops and backends share (so that `ops` and `cpu::attention` do not import each
//! other): MLA and GQA head geometry, a sequence's slice of an attention batch, the KV page size.

/// Tokens per KV page (FlashMLA's page size; DESIGN.md "The KV cache"): core's, the one the
/// schedulers allocate in, so the two can never disagree.
pub use duet_core::PAGE_TOKENS;

/// MLA head geometry of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MlaShape {
    pub heads: usize,
    pub kv_lora: usize,
    pub rope: usize,
    pub nope: usize,
    pub v: usize,
}

/// Grouped-query attention geometry of one layer (Llama, Qwen2): `heads` query heads share
/// `kv_heads` key/value heads of `head_dim` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GqaShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl GqaShape {
    /// Values per token in a layer's pool: `[k | v]`, each `kv_heads × head_dim`.
    pub fn pool_width(&self) -> usize {
        2 * self.kv_heads * self.head_dim
    }
}

/// One sequence's slice of a batch for attention: its queries are rows `q_row..q_row + q_len`,
/// and after this step its cache holds `ctx_len` tokens (the new ones last) in `block_table`'s
/// pages.
#[derive(Debug, Clone, Copy)]
pub struct AttnSeq<'a> {
    pub q_row: usize,
    pub q_len: usize,
    pub ctx_len: usize,
    pub block_table: &'a [u32],
}
