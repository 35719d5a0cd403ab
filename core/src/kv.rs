//! One worker's KV pages: a page allocator plus a radix-tree prefix cache at page granularity.
//!
//! # Algorithm
//!
//! Pages are ids `0..pages_total`; a page holds the latent KV of [`PAGE_TOKENS`] consecutive tokens of
//! one sequence. Each live sequence owns a *block table* (its pages in token order), and every page
//! carries a reference count: the number of live sequences whose block table contains it.
//!
//! The prefix cache is SGLang's `RadixCache` with `page_size = 64` (sglang/srt/mem_cache/radix_cache.py):
//! a tree whose edges are the 64 token ids of one *full* page, so a root-to-node path spells a
//! page-aligned token prefix and the node holds the page with that prefix's KV. Partial pages are never
//! cached or matched, because their KV would be overwritten by whoever extends them.
//!
//! - [`KvManager::open`] walks the tree along the prompt, pins the matched pages (reference count) and
//!   puts them at the front of the new block table. The match stops one token short of the prompt so that
//!   at least one token is computed: the engine needs its logits to sample.
//! - [`KvManager::close`] with `cache_tokens` inserts the sequence's full pages; where a page with the same
//!   key already exists (two sequences computed the same prefix concurrently) the existing node wins and the
//!   sequence's duplicate page is freed when its last reference goes.
//! - A cached node is *locked* while its page is referenced or any descendant is locked (SGLang's
//!   `lock_ref`). Unlocked nodes are *evictable*; eviction removes unlocked leaves in LRU order of
//!   `last_access_us` (ties: lower node id), so a parent goes only after its children, and a pinned page
//!   is never evicted. Allocation evicts only when the free list is short.
//!
//! Every page is in exactly one of three states: on the free list, in the cache (referenced or not), or
//! referenced by live sequences without being cached. [`KvManager::check_invariants`] recomputes all of
//! it from the block tables.
//!
//! "No pages now" is data ([`Alloc::Later`], [`ForkResult::Later`]), not an error: the scheduler waits or
//! preempts. Errors are caller bugs visible at the edge: an unknown or duplicate sequence id.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;

pub use crate::PAGE_TOKENS;
use crate::pages_for;
use crate::types::SeqId;

/// The KV manager's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvConfig {
    /// Pages in the worker's pool (one pool per layer, all indexed by the same page id).
    pub pages_total: u32,
    /// Whether finished sequences' full pages are kept for prefix matching.
    pub prefix_cache: bool,
}

/// The result of an allocation: either done, or not enough pages now (nothing changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alloc {
    Ok,
    /// `needed` more pages were asked for; `available` (free + evictable) exist now.
    Later {
        needed: usize,
        available: usize,
    },
}

/// The result of [`KvManager::fork`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForkResult {
    /// The child exists. Each `(src_page, dst_page)` is a partial tail page whose contents the caller
    /// must copy from the parent's page into the child's fresh page before either writes it.
    Ok(Vec<(u32, u32)>),
    /// The child needs a fresh page for its partial tail and none is available; nothing changed.
    Later { needed: usize, available: usize },
}

/// Prefix-cache hit accounting since the manager was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens presented to [`KvManager::open`].
    pub queried_tokens: u64,
    /// Of those, tokens served from cached pages.
    pub hit_tokens: u64,
}

/// Caller errors at the KV manager's (and the scheduler's) edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("sequence {0} is already open")]
    DuplicateSeq(SeqId),
    #[error("sequence {0} is not open")]
    UnknownSeq(SeqId),
    #[error(
        "fork of sequence {parent}: {shared_tokens} shared tokens exceed the {parent_tokens} tokens its pages cover"
    )]
    ForkBeyondParent {
        parent: SeqId,
        shared_tokens: usize,
        parent_tokens: usize,
    },
    #[error("sequence {0} has no tokens")]
    EmptySeq(SeqId),
    #[error(
        "sequence {seq}: {computed} computed tokens leave nothing to compute of its {len} tokens"
    )]
    NothingToCompute {
        seq: SeqId,
        computed: usize,
        len: usize,
    },
    #[error(
        "sequence {seq}: {computed} computed tokens but its reserved pages cover {covered} tokens (reserve first)"
    )]
    NotReserved {
        seq: SeqId,
        computed: usize,
        covered: usize,
    },
}

/// Node id of the tree's root, which holds no page.
const ROOT: u32 = 0;
/// `page_node` entry of a page that is not cached.
const NO_NODE: u32 = u32::MAX;

/// One cached full page: the edge from its parent is `key`, the page's 64 token ids.
#[derive(Debug)]
struct Node {
    parent: u32,
    key: Box<[u32]>,
    page: u32,
    children: BTreeMap<Box<[u32]>, u32>,
    last_access_us: u64,
    /// (page referenced by a live sequence) + (number of locked children). Zero means evictable.
    lock: u32,
}

#[derive(Debug)]
struct SeqPages {
    table: Vec<u32>,
    /// What `open` added to the prefix stats, so `cancel_open` can take it back.
    queried_tokens: u64,
    hit_tokens: u64,
}

/// One worker's page allocator and prefix cache. See the module doc.
#[derive(Debug)]
pub struct KvManager {
    cfg: KvConfig,
    /// Free pages; popped from the end, so a fresh manager hands out 0, 1, 2, …
    free: Vec<u32>,
    /// Live-sequence references per page.
    refs: Vec<u32>,
    /// The cache node holding each page, or `NO_NODE`.
    page_node: Vec<u32>,
    /// Node slab; index 0 is the root. `None` slots are reusable, listed in `free_nodes`.
    nodes: Vec<Option<Node>>,
    free_nodes: Vec<u32>,
    /// Unlocked leaves by (last access, node id): the eviction order.
    evictable_leaves: BTreeSet<(u64, u32)>,
    /// Unlocked cached nodes (leaves or not): all of them can be evicted leaf by leaf.
    evictable: usize,
    /// Cached nodes, root excluded.
    cached: usize,
    /// Pages with at least one reference.
    used: usize,
    /// Looked up, never iterated in an order that matters.
    seqs: FxHashMap<SeqId, SeqPages>,
    stats: PrefixStats,
}

impl KvManager {
    pub fn new(cfg: KvConfig) -> Self {
        let total = cfg.pages_total as usize;
        let root = Node {
            parent: ROOT,
            key: Box::new([]),
            page: u32::MAX,
            children: BTreeMap::new(),
            last_access_us: 0,
            lock: 0,
        };
        KvManager {
            cfg,
            free: (0..cfg.pages_total).rev().collect(),
            refs: vec![0; total],
            page_node: vec![NO_NODE; total],
            nodes: vec![Some(root)],
            free_nodes: Vec::new(),
            evictable_leaves: BTreeSet::new(),
            evictable: 0,
            cached: 0,
            used: 0,
            seqs: FxHashMap::default(),
            stats: PrefixStats::default(),
        }
    }

    pub fn config(&self) -> KvConfig {
        self.cfg
    }

    /// Starts a sequence whose prompt is `tokens`: matches the longest cached full-page prefix, pins those
    /// pages and puts them at the front of the block table. Returns the number of cached tokens: a multiple
    /// of [`PAGE_TOKENS`], and below `tokens.len()` so that at least one token is computed (a 128-token
    /// prompt fully cached returns 64). Returns 0 with the prefix cache off, or for an empty `tokens`
    /// (which [`crate::sched::Scheduler::reserve`] uses to open a sequence whose KV arrives from elsewhere).
    pub fn open(&mut self, seq: SeqId, tokens: &[u32], now_us: u64) -> Result<usize, KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::DuplicateSeq(seq));
        }
        let path = if self.cfg.prefix_cache {
            self.match_path(tokens)
        } else {
            Vec::new()
        };
        let mut table = Vec::with_capacity(path.len());
        for id in path {
            let page = self.node(id).page;
            self.add_ref(page);
            self.touch(id, now_us);
            table.push(page);
        }
        let hit = table.len() * PAGE_TOKENS;
        debug_assert!(tokens.is_empty() || hit < tokens.len());
        let sp = SeqPages {
            table,
            queried_tokens: tokens.len() as u64,
            hit_tokens: hit as u64,
        };
        self.stats.queried_tokens += sp.queried_tokens;
        self.stats.hit_tokens += sp.hit_tokens;
        self.seqs.insert(seq, sp);
        Ok(hit)
    }

    /// Undoes an [`KvManager::open`] whose sequence never ran (its first allocation came back `Later`):
    /// drops its references like `close(seq, None)` and takes its query back out of [`PrefixStats`], so an
    /// admission retried every step does not inflate the hit rate.
    pub fn cancel_open(&mut self, seq: SeqId) -> Result<(), KvError> {
        let sp = self.seqs.remove(&seq).ok_or(KvError::UnknownSeq(seq))?;
        self.stats.queried_tokens -= sp.queried_tokens;
        self.stats.hit_tokens -= sp.hit_tokens;
        for page in sp.table {
            self.drop_ref(page);
        }
        Ok(())
    }

    /// Grows `seq`'s block table to cover `tokens` tokens (never shrinks it). All or nothing: on
    /// `Later` nothing changed. Evicts LRU evictable cached pages when the free list is short.
    pub fn grow(&mut self, seq: SeqId, tokens: usize, _now_us: u64) -> Result<Alloc, KvError> {
        let have = self
            .seqs
            .get(&seq)
            .ok_or(KvError::UnknownSeq(seq))?
            .table
            .len();
        let needed = pages_for(tokens).saturating_sub(have);
        if needed == 0 {
            return Ok(Alloc::Ok);
        }
        let available = self.pages_available();
        if needed > available {
            return Ok(Alloc::Later { needed, available });
        }
        let pages = self.take_pages(needed);
        self.seqs
            .get_mut(&seq)
            .expect("checked above")
            .table
            .extend(pages);
        Ok(Alloc::Ok)
    }

    /// `seq`'s pages in token order, or `None` if it is not open.
    pub fn block_table(&self, seq: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq).map(|s| s.table.as_slice())
    }

    /// A new sequence `child` sharing `parent`'s full pages covering the first `shared_tokens` tokens
    /// (reference counts, no copy). If `shared_tokens` is not a multiple of [`PAGE_TOKENS`] the child gets
    /// a fresh page for the partial tail and the result lists the `(src_page, dst_page)` the caller must
    /// copy. The shared full pages are safe to share because neither sequence writes below its length.
    pub fn fork(
        &mut self,
        parent: SeqId,
        child: SeqId,
        shared_tokens: usize,
        _now_us: u64,
    ) -> Result<ForkResult, KvError> {
        if self.seqs.contains_key(&child) {
            return Err(KvError::DuplicateSeq(child));
        }
        let parent_table = &self
            .seqs
            .get(&parent)
            .ok_or(KvError::UnknownSeq(parent))?
            .table;
        let parent_tokens = parent_table.len() * PAGE_TOKENS;
        if shared_tokens > parent_tokens {
            return Err(KvError::ForkBeyondParent {
                parent,
                shared_tokens,
                parent_tokens,
            });
        }
        let full = shared_tokens / PAGE_TOKENS;
        let partial = !shared_tokens.is_multiple_of(PAGE_TOKENS);
        let mut table = parent_table[..full].to_vec();
        let tail_src = partial.then(|| parent_table[full]);
        let available = self.pages_available();
        if partial && available == 0 {
            return Ok(ForkResult::Later {
                needed: 1,
                available,
            });
        }
        for &page in &table {
            self.add_ref(page);
        }
        let mut copies = Vec::new();
        if let Some(src) = tail_src {
            // The parent's pages are referenced, hence locked: eviction here cannot take `src`.
            let dst = self.take_pages(1)[0];
            table.push(dst);
            copies.push((src, dst));
        }
        self.seqs.insert(
            child,
            SeqPages {
                table,
                queried_tokens: 0,
                hit_tokens: 0,
            },
        );
        Ok(ForkResult::Ok(copies))
    }

    /// Ends a sequence. With `cache_tokens` (the token ids whose KV is in the sequence's pages, in order)
    /// and the prefix cache on, its full pages are inserted into the cache; a page already cached under the
    /// same key is kept and the sequence's duplicate is freed. Then every reference the sequence holds is
    /// dropped exactly once.
    pub fn close(
        &mut self,
        seq: SeqId,
        cache_tokens: Option<&[u32]>,
        now_us: u64,
    ) -> Result<(), KvError> {
        let sp = self.seqs.remove(&seq).ok_or(KvError::UnknownSeq(seq))?;
        if let Some(tokens) = cache_tokens
            && self.cfg.prefix_cache
        {
            self.insert(&sp.table, tokens, now_us);
        }
        for page in sp.table {
            self.drop_ref(page);
        }
        Ok(())
    }

    pub fn pages_total(&self) -> usize {
        self.cfg.pages_total as usize
    }

    /// Pages on the free list.
    pub fn pages_free(&self) -> usize {
        self.free.len()
    }

    /// Cached pages that no live sequence pins (directly or through a descendant).
    pub fn pages_evictable(&self) -> usize {
        self.evictable
    }

    /// Pages an allocation can get now: free + evictable.
    pub fn pages_available(&self) -> usize {
        self.free.len() + self.evictable
    }

    /// Pages referenced by at least one live sequence.
    pub fn pages_used(&self) -> usize {
        self.used
    }

    /// Pages in the prefix cache, referenced or not.
    pub fn pages_cached(&self) -> usize {
        self.cached
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    /// Whether `seq` is open.
    pub fn is_open(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Recomputes every count from the block tables and the tree, and panics with a message naming the
    /// first broken invariant. O(pages + nodes): for tests and simulation, not the hot path.
    pub fn check_invariants(&self) {
        let total = self.pages_total();
        let mut refs = vec![0u32; total];
        for (seq, sp) in &self.seqs {
            let mut seen = BTreeSet::new();
            for &p in &sp.table {
                assert!((p as usize) < total, "seq {seq}: page {p} out of range");
                assert!(
                    seen.insert(p),
                    "seq {seq}: page {p} twice in its block table"
                );
                refs[p as usize] += 1;
            }
        }
        assert_eq!(
            refs, self.refs,
            "reference counts disagree with block tables"
        );
        let used = refs.iter().filter(|&&r| r > 0).count();
        assert_eq!(used, self.used, "pages_used");

        let mut on_free = vec![false; total];
        for &p in &self.free {
            assert!(
                !on_free[p as usize],
                "page {p} on the free list twice (double free)"
            );
            on_free[p as usize] = true;
            assert_eq!(self.refs[p as usize], 0, "free page {p} is referenced");
            assert_eq!(
                self.page_node[p as usize], NO_NODE,
                "free page {p} is cached"
            );
        }
        let cached_pages = self.page_node.iter().filter(|&&n| n != NO_NODE).count();
        let referenced_uncached = (0..total)
            .filter(|&p| self.refs[p] > 0 && self.page_node[p] == NO_NODE)
            .count();
        let lost: Vec<usize> = (0..total)
            .filter(|&p| !on_free[p] && self.refs[p] == 0 && self.page_node[p] == NO_NODE)
            .collect();
        assert!(
            lost.is_empty(),
            "pages leaked (neither free, cached nor referenced): {lost:?}"
        );
        assert_eq!(
            self.free.len() + cached_pages + referenced_uncached,
            total,
            "free + cached + referenced-uncached != total"
        );
        self.check_tree(cached_pages);
        assert!(self.stats.hit_tokens <= self.stats.queried_tokens);
    }

    fn check_tree(&self, cached_pages: usize) {
        let mut live = 0;
        let mut evictable = 0;
        let mut leaves = BTreeSet::new();
        for (id, slot) in self.nodes.iter().enumerate() {
            let Some(n) = slot else { continue };
            let id = id as u32;
            for (key, &c) in &n.children {
                let child = self.node(c);
                assert_eq!(child.parent, id, "node {c}: parent link");
                assert_eq!(&child.key, key, "node {c}: key differs from its edge");
            }
            if id == ROOT {
                continue;
            }
            live += 1;
            assert_eq!(
                n.key.len(),
                PAGE_TOKENS,
                "node {id}: key is not one full page"
            );
            assert_eq!(
                self.page_node[n.page as usize], id,
                "node {id}: page_node link"
            );
            let locked_children = n
                .children
                .values()
                .filter(|&&c| self.node(c).lock > 0)
                .count() as u32;
            let expected = u32::from(self.refs[n.page as usize] > 0) + locked_children;
            assert_eq!(n.lock, expected, "node {id}: lock count");
            if n.lock == 0 {
                evictable += 1;
                if n.children.is_empty() {
                    leaves.insert((n.last_access_us, id));
                }
            }
        }
        assert_eq!(live, self.cached, "cached node count");
        assert_eq!(live, cached_pages, "cached pages vs nodes");
        assert_eq!(evictable, self.evictable, "evictable count");
        assert_eq!(leaves, self.evictable_leaves, "evictable leaf set");
    }

    // ---- internals ----

    fn node(&self, id: u32) -> &Node {
        self.nodes[id as usize]
            .as_ref()
            .expect("node id refers to a live node")
    }

    fn node_mut(&mut self, id: u32) -> &mut Node {
        self.nodes[id as usize]
            .as_mut()
            .expect("node id refers to a live node")
    }

    /// Nodes along the longest cached full-page prefix of `tokens`, leaving at least one token uncached.
    fn match_path(&self, tokens: &[u32]) -> Vec<u32> {
        let max_pages = tokens.len().saturating_sub(1) / PAGE_TOKENS;
        let mut path = Vec::new();
        let mut at = ROOT;
        for key in tokens.chunks_exact(PAGE_TOKENS).take(max_pages) {
            match self.node(at).children.get(key) {
                Some(&c) => {
                    path.push(c);
                    at = c;
                }
                None => break,
            }
        }
        path
    }

    /// Pops `n` pages off the free list, evicting first if it is short, and references them.
    /// Precondition: `n <= pages_available()`.
    fn take_pages(&mut self, n: usize) -> Vec<u32> {
        debug_assert!(n <= self.pages_available());
        if self.free.len() < n {
            self.evict(n - self.free.len());
        }
        let mut pages = self.free.split_off(self.free.len() - n);
        // The free list is a stack: hand pages out in pop order.
        pages.reverse();
        for &p in &pages {
            self.add_ref(p);
        }
        pages
    }

    /// Evicts `n` unlocked leaves, least recently used first. Every unlocked node's subtree is unlocked,
    /// so while `evictable > 0` an unlocked leaf exists.
    fn evict(&mut self, n: usize) {
        for _ in 0..n {
            let (_, id) = self
                .evictable_leaves
                .pop_first()
                .expect("evictable > 0 implies an evictable leaf");
            let node = self.nodes[id as usize].take().expect("leaf is live");
            debug_assert!(node.lock == 0 && node.children.is_empty());
            debug_assert_eq!(self.refs[node.page as usize], 0, "evicting a pinned page");
            self.page_node[node.page as usize] = NO_NODE;
            self.free.push(node.page);
            self.free_nodes.push(id);
            self.evictable -= 1;
            self.cached -= 1;
            let parent = self.node_mut(node.parent);
            parent.children.remove(&node.key);
            let becomes_leaf = parent.children.is_empty() && parent.lock == 0;
            let key = (parent.last_access_us, node.parent);
            if node.parent != ROOT && becomes_leaf {
                self.evictable_leaves.insert(key);
            }
        }
    }

    /// Inserts the full pages of `table` under the keys spelled by `tokens`.
    fn insert(&mut self, table: &[u32], tokens: &[u32], now_us: u64) {
        let mut at = ROOT;
        for (key, &page) in tokens.chunks_exact(PAGE_TOKENS).zip(table) {
            if let Some(&c) = self.node(at).children.get(key) {
                // Cached already (ours from the prefix match, or a duplicate computed concurrently: the
                // existing node wins and our page goes back when its references drop).
                self.touch(c, now_us);
                at = c;
                continue;
            }
            if self.page_node[page as usize] != NO_NODE {
                // The page is cached under another prefix: the caller's tokens do not describe this
                // page's KV. Caching less is always safe.
                break;
            }
            debug_assert!(
                self.refs[page as usize] > 0,
                "closing sequence holds its pages"
            );
            let id = self.alloc_node(Node {
                parent: at,
                key: key.into(),
                page,
                children: BTreeMap::new(),
                last_access_us: now_us,
                lock: 0,
            });
            self.page_node[page as usize] = id;
            self.cached += 1;
            let parent = self.node(at);
            if at != ROOT && parent.children.is_empty() && parent.lock == 0 {
                // It stops being a leaf.
                let k = (parent.last_access_us, at);
                self.evictable_leaves.remove(&k);
            }
            self.node_mut(at).children.insert(key.into(), id);
            // Born unlocked (counted evictable), then locked for the reference the closing sequence
            // still holds; `drop_ref` unlocks it in `close`.
            self.evictable += 1;
            self.lock_up(id);
            at = id;
        }
    }

    fn alloc_node(&mut self, node: Node) -> u32 {
        match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id as usize] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                (self.nodes.len() - 1) as u32
            }
        }
    }

    /// Refreshes a node's LRU time, keeping the evictable leaf set keyed correctly.
    fn touch(&mut self, id: u32, now_us: u64) {
        let n = self.node(id);
        let old = n.last_access_us;
        let new = old.max(now_us);
        if n.lock == 0 && n.children.is_empty() {
            self.evictable_leaves.remove(&(old, id));
            self.evictable_leaves.insert((new, id));
        }
        self.node_mut(id).last_access_us = new;
    }

    fn add_ref(&mut self, page: u32) {
        let r = &mut self.refs[page as usize];
        *r += 1;
        if *r == 1 {
            self.used += 1;
            let node = self.page_node[page as usize];
            if node != NO_NODE {
                self.lock_up(node);
            }
        }
    }

    fn drop_ref(&mut self, page: u32) {
        let r = &mut self.refs[page as usize];
        debug_assert!(*r > 0, "page {page} dropped more often than referenced");
        *r -= 1;
        if *r == 0 {
            self.used -= 1;
            let node = self.page_node[page as usize];
            if node == NO_NODE {
                self.free.push(page);
            } else {
                self.unlock_up(node);
            }
        }
    }

    /// Adds one lock to `id`; a node going 0 → 1 stops being evictable and locks its parent in turn.
    fn lock_up(&mut self, mut id: u32) {
        while id != ROOT {
            let n = self.node_mut(id);
            n.lock += 1;
            if n.lock != 1 {
                break;
            }
            let (leaf, key, parent) = (n.children.is_empty(), (n.last_access_us, id), n.parent);
            self.evictable -= 1;
            if leaf {
                self.evictable_leaves.remove(&key);
            }
            id = parent;
        }
    }

    /// Removes one lock from `id`; a node going 1 → 0 becomes evictable and unlocks its parent in turn.
    fn unlock_up(&mut self, mut id: u32) {
        while id != ROOT {
            let n = self.node_mut(id);
            debug_assert!(n.lock > 0);
            n.lock -= 1;
            if n.lock != 0 {
                break;
            }
            let (leaf, key, parent) = (n.children.is_empty(), (n.last_access_us, id), n.parent);
            self.evictable += 1;
            if leaf {
                self.evictable_leaves.insert(key);
            }
            id = parent;
        }
    }

    /// The full token prefix a cached page stands for (root to its node), for tests.
    #[cfg(test)]
    fn cached_prefix(&self, page: u32) -> Option<Vec<u32>> {
        let mut id = self.page_node[page as usize];
        if id == NO_NODE {
            return None;
        }
        let mut keys = Vec::new();
        while id != ROOT {
            let n = self.node(id);
            keys.push(n.key.clone());
            id = n.parent;
        }
        Some(keys.iter().rev().flat_map(|k| k.iter().copied()).collect())
    }
}

#[cfg(test)]
mod tests;
