//! The paged KV cache of one model replica: one pool per layer, `[pages, PAGE_TOKENS, width]`
//! (`width` = MLA's latent `kv_lora_rank + qk_rope_head_dim`, or GQA's `[k | v]`,
//! `2 · kv_heads · head_dim`), and a free list of page ids shared by all layers (a sequence's page `p` holds its tokens `64p..64p+63` in every layer's pool).
//!
//! This is the engine-level cache that `duet generate` and the tests drive directly; the serving
//! path's allocator with prefix sharing lives in core/ and hands page ids to the same pools.

use duet_kernels::ops::PAGE_TOKENS;
use duet_kernels::{DType, Device, Tensor};

use crate::{Error, ModelConfig, Result};

/// What a cache's pools hold per token and layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvContent {
    /// DeepSeek's MLA latent `[c_kv | k_pe]`.
    Latent,
    /// Grouped-query attention's `[k | v]` (Qwen2, Llama).
    KeysValues,
}

pub struct KvCache {
    pub(crate) pools: Vec<Tensor>,
    free: Vec<u32>,
    pages: usize,
    content: KvContent,
    width: usize,
    dtype: DType,
}

impl KvCache {
    pub fn new(cfg: &ModelConfig, pages: usize, dtype: DType, device: Device) -> Self {
        let width = cfg.kv_width();
        let content = match cfg.architecture() {
            Ok(a) if a.is_gqa() => KvContent::KeysValues,
            _ => KvContent::Latent,
        };
        let pools = (0..cfg.num_hidden_layers)
            .map(|_| Tensor::zeros(&[pages, PAGE_TOKENS, width], dtype, device))
            .collect();
        Self {
            pools,
            // Popped from the back: hand out low page ids first, which keeps tests readable.
            free: (0..pages as u32).rev().collect(),
            pages,
            content,
            width,
            dtype,
        }
    }

    /// What the pools hold; with [`KvCache::width`] and [`KvCache::dtype`], the layout a KV
    /// transfer must match.
    pub fn content(&self) -> KvContent {
        self.content
    }

    /// Values per token and layer.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn pages_total(&self) -> usize {
        self.pages
    }

    pub fn pages_free(&self) -> usize {
        self.free.len()
    }

    /// Bytes one token occupies across all layers (70,272 for V3 in BF16).
    pub fn bytes_per_token(&self) -> usize {
        self.pools
            .iter()
            .map(|p| p.size_bytes() / (self.pages * PAGE_TOKENS).max(1))
            .sum()
    }

    /// Grows `block_table` so it covers `tokens` tokens. All or nothing: on `KvFull` nothing
    /// was taken.
    pub fn ensure(&mut self, block_table: &mut Vec<u32>, tokens: usize) -> Result<()> {
        let needed = tokens
            .div_ceil(PAGE_TOKENS)
            .saturating_sub(block_table.len());
        if needed > self.free.len() {
            return Err(Error::KvFull {
                needed,
                free: self.free.len(),
            });
        }
        for _ in 0..needed {
            block_table.push(self.free.pop().expect("checked above"));
        }
        Ok(())
    }

    pub fn layers(&self) -> usize {
        self.pools.len()
    }

    /// Bytes of one page in one layer's pool (64 × 576 × 2 = 73,728 for V3 in BF16).
    pub fn page_bytes(&self) -> usize {
        self.pools
            .first()
            .map_or(0, duet_kernels::ops::kv_page_bytes)
    }

    /// Appends layer `layer`'s bytes of `pages` to `out` (the KV transfer wire form).
    pub fn read_pages(&self, layer: usize, pages: &[u32], out: &mut Vec<u8>) -> Result<()> {
        let pool = self.pools.get(layer).ok_or_else(|| {
            Error::Invalid(format!(
                "layer {layer} of a {}-layer cache",
                self.pools.len()
            ))
        })?;
        Ok(duet_kernels::ops::kv_pages_read(pool, pages, out)?)
    }

    /// Writes bytes read by [`KvCache::read_pages`] from a cache of the same model and dtype.
    pub fn write_pages(&mut self, layer: usize, pages: &[u32], bytes: &[u8]) -> Result<()> {
        let n = self.pools.len();
        let pool = self
            .pools
            .get_mut(layer)
            .ok_or_else(|| Error::Invalid(format!("layer {layer} of a {n}-layer cache")))?;
        Ok(duet_kernels::ops::kv_pages_write(pool, pages, bytes)?)
    }

    /// Returns a sequence's pages to the free list.
    pub fn release(&mut self, block_table: &mut Vec<u32>) {
        debug_assert!(
            block_table
                .iter()
                .all(|p| (*p as usize) < self.pages && !self.free.contains(p))
        );
        self.free.append(block_table);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> ModelConfig {
        serde_json::from_value(crate::tiny::config_json(crate::tiny::TinyArch::V3)).unwrap()
    }

    proptest! {
        /// Under any sequence of grow/release, no page is held twice or lost, and a failed grow
        /// takes nothing.
        #[test]
        fn pages_are_never_leaked_or_shared(ops in proptest::collection::vec((0usize..4, 0usize..300, any::<bool>()), 1..60)) {
            let mut cache = KvCache::new(&cfg(), 10, DType::BF16, Device::Cpu);
            let mut tables: Vec<Vec<u32>> = vec![Vec::new(); 4];
            for (seq, tokens, release) in ops {
                if release {
                    cache.release(&mut tables[seq]);
                    prop_assert!(tables[seq].is_empty());
                } else {
                    let before = (tables[seq].clone(), cache.pages_free());
                    match cache.ensure(&mut tables[seq], tokens) {
                        Ok(()) => prop_assert!(tables[seq].len() * PAGE_TOKENS >= tokens),
                        Err(Error::KvFull { .. }) => prop_assert_eq!((tables[seq].clone(), cache.pages_free()), before),
                        Err(e) => prop_assert!(false, "unexpected error {}", e),
                    }
                }
                let mut held: Vec<u32> = tables.iter().flatten().copied().collect();
                let n = held.len();
                held.sort_unstable();
                held.dedup();
                prop_assert_eq!(held.len(), n, "a page is in two block tables");
                prop_assert_eq!(n + cache.pages_free(), 10);
            }
        }
    }

    #[test]
    fn v3_latent_bytes_per_token() {
        // DESIGN.md: 576 BF16 values per token and layer; 61 layers give 70,272 bytes.
        let mut c = cfg();
        c.num_hidden_layers = 61;
        c.kv_lora_rank = 512;
        c.qk_rope_head_dim = 64;
        let cache = KvCache::new(&c, 1, DType::BF16, Device::Cpu);
        assert_eq!(cache.bytes_per_token(), 70_272);
    }
}
