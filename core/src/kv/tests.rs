use super::*;
use proptest::prelude::*;

fn kv(pages: u32) -> KvManager {
    KvManager::new(KvConfig {
        pages_total: pages,
        prefix_cache: true,
    })
}

/// `n` tokens whose page `i` is block `blocks[i]` (a page-sized pattern), so prompts built from the same
/// block sequence share a cacheable prefix.
fn prompt(blocks: &[u32], tail: usize) -> Vec<u32> {
    let mut t: Vec<u32> = blocks
        .iter()
        .flat_map(|&b| (0..PAGE_TOKENS as u32).map(move |j| b * 1000 + j))
        .collect();
    t.extend((0..tail as u32).map(|j| 900_000 + j));
    t
}

/// Opens, allocates the whole prompt and closes with caching: leaves the prompt's full pages cached.
fn cache_prompt(kv: &mut KvManager, seq: SeqId, tokens: &[u32], now: u64) {
    kv.open(seq, tokens, now).unwrap();
    assert_eq!(kv.grow(seq, tokens.len(), now).unwrap(), Alloc::Ok);
    kv.close(seq, Some(tokens), now).unwrap();
    kv.check_invariants();
}

#[test]
fn open_on_empty_cache_matches_nothing_and_grow_allocates_in_order() {
    let mut kv = kv(8);
    assert_eq!(kv.open(1, &prompt(&[1, 2], 10), 0), Ok(0));
    assert_eq!(kv.grow(1, 138, 0), Ok(Alloc::Ok));
    assert_eq!(kv.block_table(1), Some(&[0, 1, 2][..]));
    assert_eq!((kv.pages_used(), kv.pages_free()), (3, 5));
    // Growing to fewer tokens is a no-op, never a shrink.
    assert_eq!(kv.grow(1, 1, 0), Ok(Alloc::Ok));
    assert_eq!(kv.block_table(1).unwrap().len(), 3);
    kv.check_invariants();
}

#[test]
fn cached_match_always_leaves_one_token_to_compute() {
    // (prompt tokens, cached tokens) once the first two pages of the same blocks are cached.
    let cases = [(64, 0), (65, 64), (128, 64), (129, 128), (200, 192)];
    let mut kv = kv(16);
    cache_prompt(&mut kv, 1, &prompt(&[1, 2, 3], 0), 10);
    for (i, (len, cached)) in cases.into_iter().enumerate() {
        let mut t = prompt(&[1, 2, 3], 0);
        t.truncate(len.min(t.len()));
        t.resize(len, 7);
        let seq = 100 + i as u64;
        assert_eq!(kv.open(seq, &t, 20), Ok(cached), "prompt of {len} tokens");
        assert_eq!(
            kv.block_table(seq).unwrap(),
            &[0u32, 1, 2][..cached / PAGE_TOKENS]
        );
        kv.close(seq, None, 20).unwrap();
    }
    kv.check_invariants();
}

#[test]
fn prefix_cache_off_matches_nothing_and_caches_nothing() {
    let mut kv = KvManager::new(KvConfig {
        pages_total: 8,
        prefix_cache: false,
    });
    let t = prompt(&[1, 2], 1);
    cache_prompt(&mut kv, 1, &t, 0);
    assert_eq!((kv.pages_cached(), kv.pages_free()), (0, 8));
    assert_eq!(kv.open(2, &t, 1), Ok(0));
}

#[test]
fn hit_pins_pages_and_stats_count_tokens() {
    let mut kv = kv(8);
    let t = prompt(&[1, 2], 5);
    cache_prompt(&mut kv, 1, &t, 0);
    assert_eq!((kv.pages_cached(), kv.pages_evictable()), (2, 2));
    assert_eq!(kv.open(2, &t, 1), Ok(128));
    // Pinned: no longer evictable, counted as used.
    assert_eq!((kv.pages_evictable(), kv.pages_used()), (0, 2));
    assert_eq!(
        kv.prefix_stats(),
        PrefixStats {
            queried_tokens: 2 * 133,
            hit_tokens: 128
        }
    );
    kv.cancel_open(2).unwrap();
    assert_eq!(kv.prefix_stats().hit_tokens, 0);
    assert_eq!(kv.pages_evictable(), 2);
    kv.check_invariants();
}

#[test]
fn concurrent_duplicate_prefix_is_deduplicated_on_close() {
    let mut kv = kv(8);
    let t = prompt(&[4, 5], 3);
    for seq in [1, 2] {
        assert_eq!(kv.open(seq, &t, 0), Ok(0));
        assert_eq!(kv.grow(seq, t.len(), 0), Ok(Alloc::Ok));
    }
    kv.close(1, Some(&t), 1).unwrap();
    kv.close(2, Some(&t), 2).unwrap();
    // Seq 1's two full pages are cached; seq 2's duplicates and both tails are free.
    assert_eq!((kv.pages_cached(), kv.pages_free()), (2, 6));
    assert_eq!(kv.open(3, &t, 3), Ok(128));
    assert_eq!(kv.block_table(3), Some(&[0, 1][..]));
    kv.check_invariants();
}

#[test]
fn eviction_takes_least_recently_used_leaves_first() {
    let mut kv = kv(4);
    cache_prompt(&mut kv, 1, &prompt(&[1, 2], 0), 10); // pages 0 (block 1), 1 (block 2)
    cache_prompt(&mut kv, 2, &prompt(&[3], 0), 20); // page 2
    // Touch [1] at 30: its leaf [1,2] keeps time 10 and goes first, then [3] (20), then [1] (30).
    kv.open(3, &prompt(&[1], 1), 30).unwrap();
    kv.close(3, None, 30).unwrap();
    assert_eq!((kv.pages_free(), kv.pages_evictable()), (1, 3));
    kv.open(4, &[], 40).unwrap();
    assert_eq!(kv.grow(4, 2 * PAGE_TOKENS, 40), Ok(Alloc::Ok));
    kv.check_invariants();
    assert_eq!(kv.cached_prefix(0), Some(prompt(&[1], 0)));
    assert_eq!(kv.cached_prefix(1), None);
    assert_eq!(kv.cached_prefix(2), Some(prompt(&[3], 0)));
    assert_eq!(kv.grow(4, 3 * PAGE_TOKENS, 50), Ok(Alloc::Ok));
    assert_eq!(kv.cached_prefix(2), None);
    assert_eq!(kv.cached_prefix(0), Some(prompt(&[1], 0)));
    kv.check_invariants();
}

#[test]
fn pinned_pages_are_never_evicted_and_later_changes_nothing() {
    let mut kv = kv(3);
    cache_prompt(&mut kv, 1, &prompt(&[1, 2], 0), 0);
    assert_eq!(kv.open(2, &prompt(&[1, 2], 1), 1), Ok(128)); // pins both cached pages
    assert_eq!(kv.open(3, &[], 2), Ok(0));
    assert_eq!(
        kv.grow(3, 2 * PAGE_TOKENS, 2),
        Ok(Alloc::Later {
            needed: 2,
            available: 1
        })
    );
    assert_eq!(kv.block_table(3), Some(&[][..]));
    assert_eq!((kv.pages_free(), kv.pages_cached()), (1, 2));
    assert_eq!(kv.grow(3, PAGE_TOKENS, 2), Ok(Alloc::Ok));
    kv.check_invariants();
}

#[test]
fn fork_shares_full_pages_and_copies_the_partial_tail() {
    let mut kv = kv(8);
    kv.open(1, &[], 0).unwrap();
    kv.grow(1, 150, 0).unwrap(); // pages 0, 1, 2
    assert_eq!(kv.fork(1, 2, 100, 0), Ok(ForkResult::Ok(vec![(1, 3)])));
    assert_eq!(kv.block_table(2), Some(&[0, 3][..]));
    assert_eq!(kv.fork(1, 3, 128, 0), Ok(ForkResult::Ok(vec![])));
    assert_eq!(kv.block_table(3), Some(&[0, 1][..]));
    assert_eq!(kv.pages_used(), 4);
    kv.close(1, None, 1).unwrap();
    // Page 2 was the parent's alone; 0 and 1 live on in the children.
    assert_eq!(kv.pages_used(), 3);
    kv.check_invariants();
}

#[test]
fn fork_without_a_page_for_the_tail_is_later() {
    let mut kv = kv(2);
    kv.open(1, &[], 0).unwrap();
    kv.grow(1, 100, 0).unwrap();
    assert_eq!(
        kv.fork(1, 2, 70, 0),
        Ok(ForkResult::Later {
            needed: 1,
            available: 0
        })
    );
    assert!(!kv.is_open(2));
    kv.check_invariants();
}

#[test]
fn caller_errors_are_errors() {
    let mut kv = kv(2);
    kv.open(1, &[], 0).unwrap();
    assert_eq!(kv.open(1, &[], 0), Err(KvError::DuplicateSeq(1)));
    assert_eq!(kv.grow(9, 1, 0), Err(KvError::UnknownSeq(9)));
    assert_eq!(kv.close(9, None, 0), Err(KvError::UnknownSeq(9)));
    assert_eq!(kv.fork(9, 2, 0, 0), Err(KvError::UnknownSeq(9)));
    assert_eq!(kv.fork(1, 1, 0, 0), Err(KvError::DuplicateSeq(1)));
    assert_eq!(
        kv.fork(1, 2, 1, 0),
        Err(KvError::ForkBeyondParent {
            parent: 1,
            shared_tokens: 1,
            parent_tokens: 0
        })
    );
    kv.check_invariants();
}

// ---- property test: a shadow model of page contents ----

#[derive(Debug, Clone)]
enum Op {
    Open { blocks: Vec<u32>, tail: usize },
    Extend { which: usize, extra: usize },
    Fork { which: usize, frac: u8 },
    Close { which: usize, cache: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (prop::collection::vec(0u32..3, 0..5), 0usize..70)
            .prop_map(|(blocks, tail)| Op::Open { blocks, tail }),
        2 => (any::<usize>(), 0usize..150).prop_map(|(which, extra)| Op::Extend { which, extra }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(which, frac)| Op::Fork { which, frac }),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(which, cache)| Op::Close { which, cache }),
    ]
}

struct Live {
    seq: SeqId,
    tokens: Vec<u32>,
    /// Tokens whose KV the model has written into the sequence's pages.
    computed: usize,
}

/// The test's stand-in for the GPU: `content[page]` is the token prefix whose KV the page holds (through
/// the page's last written token). A page's KV depends on the whole prefix, so equal content means
/// interchangeable pages.
struct Model {
    kv: KvManager,
    live: Vec<Live>,
    content: Vec<Option<Vec<u32>>>,
    next_seq: SeqId,
    now: u64,
}

impl Model {
    /// Writes the KV of `tokens[from..]` into `seq`'s pages (`from` is where its computed part ends).
    fn write(&mut self, seq: SeqId, tokens: &[u32], from: usize) {
        let table = self.kv.block_table(seq).unwrap().to_vec();
        assert!(table.len() * PAGE_TOKENS >= tokens.len());
        for i in from / PAGE_TOKENS..tokens.len().div_ceil(PAGE_TOKENS) {
            let end = ((i + 1) * PAGE_TOKENS).min(tokens.len());
            self.content[table[i] as usize] = Some(tokens[..end].to_vec());
        }
    }

    fn snapshot(&self) -> (usize, usize, usize, usize) {
        let kv = &self.kv;
        (
            kv.pages_free(),
            kv.pages_evictable(),
            kv.pages_used(),
            kv.pages_cached(),
        )
    }

    fn apply(&mut self, op: Op) {
        self.now += 1;
        let now = self.now;
        match op {
            Op::Open { blocks, tail } => {
                let tokens = prompt(&blocks, tail);
                let seq = self.next_seq;
                self.next_seq += 1;
                let cached = self.kv.open(seq, &tokens, now).unwrap();
                assert_eq!(cached % PAGE_TOKENS, 0);
                assert!(tokens.is_empty() || cached < tokens.len());
                let table = self.kv.block_table(seq).unwrap().to_vec();
                for (i, &p) in table.iter().enumerate() {
                    let want = &tokens[..(i + 1) * PAGE_TOKENS];
                    assert_eq!(self.kv.cached_prefix(p).as_deref(), Some(want), "hit key");
                    assert_eq!(self.content[p as usize].as_deref(), Some(want), "hit KV");
                }
                self.live.push(Live {
                    seq,
                    tokens,
                    computed: cached,
                });
                self.extend(self.live.len() - 1);
            }
            Op::Extend { which, extra } if !self.live.is_empty() => {
                let i = which % self.live.len();
                let base = 500_000 + 1000 * (self.live[i].seq as u32 % 100);
                let l = &mut self.live[i];
                let n = l.tokens.len() as u32;
                l.tokens.extend((0..extra as u32).map(|j| base + n + j));
                self.extend(i);
            }
            Op::Fork { which, frac } if !self.live.is_empty() => {
                let i = which % self.live.len();
                let parent = self.live[i].seq;
                let shared = self.live[i].computed * frac as usize / 255;
                let child = self.next_seq;
                self.next_seq += 1;
                let before = self.snapshot();
                match self.kv.fork(parent, child, shared, now).unwrap() {
                    ForkResult::Ok(copies) => {
                        let tokens = self.live[i].tokens[..shared].to_vec();
                        for (src, dst) in copies {
                            let c = self.content[src as usize].clone().unwrap();
                            assert_eq!(&c[..shared], &tokens[..], "fork copies the parent's page");
                            self.content[dst as usize] = Some(tokens.clone());
                        }
                        self.live.push(Live {
                            seq: child,
                            tokens,
                            computed: shared,
                        });
                    }
                    ForkResult::Later { .. } => {
                        assert_eq!(self.snapshot(), before);
                        assert!(!self.kv.is_open(child));
                    }
                }
            }
            Op::Close { which, cache } if !self.live.is_empty() => {
                let l = self.live.remove(which % self.live.len());
                let cache_tokens = cache.then(|| &l.tokens[..l.computed]);
                self.kv.close(l.seq, cache_tokens, now).unwrap();
            }
            _ => {}
        }
        self.check();
    }

    /// Grows live sequence `i` to its length and, when that succeeds, computes it.
    fn extend(&mut self, i: usize) {
        let (seq, len, computed) = (
            self.live[i].seq,
            self.live[i].tokens.len(),
            self.live[i].computed,
        );
        let before = self.snapshot();
        let table_before = self.kv.block_table(seq).unwrap().len();
        match self.kv.grow(seq, len, self.now).unwrap() {
            Alloc::Ok => {
                let tokens = self.live[i].tokens.clone();
                self.write(seq, &tokens, computed);
                self.live[i].computed = len;
            }
            Alloc::Later { needed, available } => {
                assert!(needed > available);
                assert_eq!(self.snapshot(), before, "Later changed nothing");
                assert_eq!(self.kv.block_table(seq).unwrap().len(), table_before);
            }
        }
    }

    fn check(&self) {
        self.kv.check_invariants();
        let mut held = BTreeSet::new();
        for l in &self.live {
            let table = self.kv.block_table(l.seq).unwrap();
            assert!(table.len() * PAGE_TOKENS >= l.computed);
            for i in 0..l.computed.div_ceil(PAGE_TOKENS) {
                let end = ((i + 1) * PAGE_TOKENS).min(l.computed);
                // Fails when another sequence wrote this page (a leak, double allocation, an eviction
                // of a pinned page, or sharing of pages whose prefixes differ).
                assert_eq!(
                    self.content[table[i] as usize].as_deref(),
                    Some(&l.tokens[..end]),
                    "seq {} page {} ({})",
                    l.seq,
                    i,
                    table[i]
                );
            }
            held.extend(table.iter().copied());
        }
        assert_eq!(held.len(), self.kv.pages_used());
        for p in 0..self.kv.pages_total() as u32 {
            if let Some(prefix) = self.kv.cached_prefix(p) {
                assert_eq!(
                    self.content[p as usize].as_ref(),
                    Some(&prefix),
                    "cached key = KV"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn kv_manager_never_leaks_or_corrupts(pages in 4u32..24, ops in prop::collection::vec(op(), 1..120)) {
        let mut m = Model {
            kv: kv(pages),
            live: Vec::new(),
            content: vec![None; pages as usize],
            next_seq: 1,
            now: 0,
        };
        for op in ops {
            m.apply(op);
        }
        // Closing everything, cached or not, leaves every page free or evictable.
        while let Some(l) = m.live.pop() {
            m.kv.close(l.seq, Some(&l.tokens[..l.computed]), m.now).unwrap();
        }
        m.kv.check_invariants();
        prop_assert_eq!(m.kv.pages_used(), 0);
        prop_assert_eq!(m.kv.pages_available(), pages as usize);
    }
}
