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

use std::collections::BTreeSet;

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

/// One cached full page. The edge from its parent is its key, the page's 64 token ids, kept in
/// `KvManager::keys` at the node's slot; the parent finds it through `KvManager::children`.
#[derive(Debug)]
struct Node {
    parent: u32,
    /// [`page_key_hash`] of the key: the node's entry in `KvManager::children` is `(parent, key_hash)`.
    key_hash: u64,
    page: u32,
    /// Cached children.
    children: u32,
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
    /// The nodes' keys, [`PAGE_TOKENS`] per node slot: one allocation for the whole tree instead of
    /// two boxed keys per node (the tree holds up to a pool's worth of pages).
    keys: Vec<u32>,
    /// Edges: (parent, hash of the child's key) → child. A hit is confirmed against the stored key,
    /// so a hash collision can only make the cache miss, never return another prefix's page.
    children: FxHashMap<(u32, u64), u32>,
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
            key_hash: 0,
            page: u32::MAX,
            children: 0,
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
            keys: vec![0; PAGE_TOKENS],
            children: FxHashMap::default(),
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
        let mut child_count = vec![0u32; self.nodes.len()];
        let mut locked_children = vec![0u32; self.nodes.len()];
        for (&(p, h), &c) in &self.children {
            let child = self.node(c);
            assert_eq!(child.parent, p, "node {c}: parent link");
            assert_eq!(
                child.key_hash, h,
                "node {c}: edge hash differs from its key hash"
            );
            assert_eq!(page_key_hash(self.key(c)), h, "node {c}: key hash");
            assert!(
                self.nodes[p as usize].is_some(),
                "node {c}: parent {p} not live"
            );
            child_count[p as usize] += 1;
            locked_children[p as usize] += u32::from(child.lock > 0);
        }
        let mut live = 0;
        let mut evictable = 0;
        let mut leaves = BTreeSet::new();
        for (id, slot) in self.nodes.iter().enumerate() {
            let Some(n) = slot else { continue };
            assert_eq!(n.children, child_count[id], "node {id}: child count");
            let id = id as u32;
            if id == ROOT {
                continue;
            }
            live += 1;
            assert_eq!(
                self.page_node[n.page as usize], id,
                "node {id}: page_node link"
            );
            let expected = u32::from(self.refs[n.page as usize] > 0) + locked_children[id as usize];
            assert_eq!(n.lock, expected, "node {id}: lock count");
            if n.lock == 0 {
                evictable += 1;
                if n.children == 0 {
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

    fn key(&self, id: u32) -> &[u32] {
        let at = id as usize * PAGE_TOKENS;
        &self.keys[at..at + PAGE_TOKENS]
    }

    /// The child of `at` whose key is `key` (hashing to `hash`).
    fn child(&self, at: u32, key: &[u32], hash: u64) -> Option<u32> {
        let &c = self.children.get(&(at, hash))?;
        (self.key(c) == key).then_some(c)
    }

    /// Nodes along the longest cached full-page prefix of `tokens`, leaving at least one token uncached.
    fn match_path(&self, tokens: &[u32]) -> Vec<u32> {
        let max_pages = tokens.len().saturating_sub(1) / PAGE_TOKENS;
        let mut path = Vec::new();
        let mut at = ROOT;
        for key in tokens.chunks_exact(PAGE_TOKENS).take(max_pages) {
            match self.child(at, key, page_key_hash(key)) {
                Some(c) => {
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
            debug_assert!(node.lock == 0 && node.children == 0);
            debug_assert_eq!(self.refs[node.page as usize], 0, "evicting a pinned page");
            self.page_node[node.page as usize] = NO_NODE;
            self.free.push(node.page);
            self.free_nodes.push(id);
            self.evictable -= 1;
            self.cached -= 1;
            self.children.remove(&(node.parent, node.key_hash));
            let parent = self.node_mut(node.parent);
            parent.children -= 1;
            let becomes_leaf = parent.children == 0 && parent.lock == 0;
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
            let hash = page_key_hash(key);
            if let Some(&c) = self.children.get(&(at, hash)) {
                if self.key(c) != key {
                    // Another key with the same hash holds the edge: cache less (always safe).
                    break;
                }
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
            let id = self.alloc_node(
                Node {
                    parent: at,
                    key_hash: hash,
                    page,
                    children: 0,
                    last_access_us: now_us,
                    lock: 0,
                },
                key,
            );
            self.page_node[page as usize] = id;
            self.cached += 1;
            let parent = self.node(at);
            if at != ROOT && parent.children == 0 && parent.lock == 0 {
                // It stops being a leaf.
                let k = (parent.last_access_us, at);
                self.evictable_leaves.remove(&k);
            }
            self.node_mut(at).children += 1;
            self.children.insert((at, hash), id);
            // Born unlocked (counted evictable), then locked for the reference the closing sequence
            // still holds; `drop_ref` unlocks it in `close`.
            self.evictable += 1;
            self.lock_up(id);
            at = id;
        }
    }

    fn alloc_node(&mut self, node: Node, key: &[u32]) -> u32 {
        let id = match self.free_nodes.pop() {
            Some(id) => {
                self.nodes[id as usize] = Some(node);
                id
            }
            None => {
                self.nodes.push(Some(node));
                self.keys.resize(self.nodes.len() * PAGE_TOKENS, 0);
                (self.nodes.len() - 1) as u32
            }
        };
        let at = id as usize * PAGE_TOKENS;
        self.keys[at..at + PAGE_TOKENS].copy_from_slice(key);
        id
    }

    /// Refreshes a node's LRU time, keeping the evictable leaf set keyed correctly.
    fn touch(&mut self, id: u32, now_us: u64) {
        let n = self.node(id);
        let old = n.last_access_us;
        let new = old.max(now_us);
        if n.lock == 0 && n.children == 0 {
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
            let (leaf, key, parent) = (n.children == 0, (n.last_access_us, id), n.parent);
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
            let (leaf, key, parent) = (n.children == 0, (n.last_access_us, id), n.parent);
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
            keys.push(self.key(id).to_vec());
            id = self.node(id).parent;
        }
        Some(keys.iter().rev().flat_map(|k| k.iter().copied()).collect())
    }
}

#[cfg(test)]
mod tests;

/// A page key's hash for the edge map (FxHash-style fold; keys are confirmed on every hit).
fn page_key_hash(key: &[u32]) -> u64 {
    let mut h = 0u64;
    for pair in key.chunks(2) {
        let v = pair.iter().fold(0u64, |v, &t| (v << 32) | u64::from(t));
        h = (h.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    h
}
