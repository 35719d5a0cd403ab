use super::*;
use proptest::prelude::*;

fn pw(id: u32, queued_tokens: u64, running: usize) -> PrefillLoad {
    PrefillLoad {
        worker: WorkerId(id),
        queued_tokens,
        running,
        alive: true,
    }
}

/// A prompt of `pages` full pages of pattern `p`, plus a 10-token tail.
fn prompt(p: u32, pages: usize) -> Vec<u32> {
    (0..(pages * PAGE_TOKENS + 10) as u32)
        .map(|j| p * 100_000 + j)
        .collect()
}

fn router() -> PrefillRouter {
    PrefillRouter::new(PrefillRouterConfig {
        affinity_min_tokens: 2 * PAGE_TOKENS,
        balance_abs_tokens: 1000,
        balance_rel: 2.0,
        tree_pages_max: 1000,
    })
}

#[test]
fn without_affinity_the_least_loaded_live_worker_wins() {
    // (workers as (id, queued, running, alive), chosen)
    type Worker = (u32, u64, usize, bool);
    let cases: [(&[Worker], Option<u32>); 5] = [
        (
            &[(0, 50, 1, true), (1, 10, 9, true), (2, 10, 3, true)],
            Some(2),
        ),
        (&[(0, 10, 3, true), (1, 10, 3, true)], Some(0)),
        (&[(0, 0, 0, false), (1, 99, 9, true)], Some(1)),
        (&[(0, 0, 0, false)], None),
        (&[], None),
    ];
    for (workers, want) in cases {
        let loads: Vec<PrefillLoad> = workers
            .iter()
            .map(|&(id, q, r, alive)| PrefillLoad {
                alive,
                ..pw(id, q, r)
            })
            .collect();
        let got = router().route(&prompt(1, 3), &loads, 0).map(|(w, _)| w.0);
        assert_eq!(got, want, "{workers:?}");
    }
}

#[test]
fn a_long_enough_match_on_a_not_overloaded_worker_wins() {
    let mut r = router();
    let p = prompt(1, 3);
    assert_eq!(
        r.route(&p, &[pw(0, 0, 0), pw(1, 0, 0)], 0),
        Some((WorkerId(0), 0))
    );
    // Worker 0 is now busier, but within 1000 + 2 × 300 of the least queued.
    let loads = [pw(0, 1500, 5), pw(1, 300, 1)];
    assert_eq!(r.route(&p, &loads, 1), Some((WorkerId(0), 3 * PAGE_TOKENS)));
    // Beyond the balance bound the least loaded worker gets it.
    let loads = [pw(0, 1700, 5), pw(1, 300, 1)];
    assert_eq!(r.route(&p, &loads, 2), Some((WorkerId(1), 0)));
    // Now both have it: the longer match ties, the less queued wins.
    assert_eq!(r.route(&p, &loads, 3), Some((WorkerId(1), 3 * PAGE_TOKENS)));
    // One shared page is below affinity_min_tokens (two pages).
    let short = [&p[..PAGE_TOKENS], &prompt(2, 2)[..]].concat();
    let loads = [pw(0, 10, 0), pw(1, 300, 1)];
    assert_eq!(r.route(&short, &loads, 4), Some((WorkerId(0), PAGE_TOKENS)));
}

#[test]
fn forgetting_a_worker_drops_its_affinity_and_trees_are_bounded() {
    let mut r = PrefillRouter::new(PrefillRouterConfig {
        tree_pages_max: 4,
        ..PrefillRouterConfig::default()
    });
    let w = [pw(0, 0, 0)];
    r.route(&prompt(1, 3), &w, 1);
    r.route(&prompt(2, 3), &w, 2);
    // The older prompt's leaves went first: prompt 2 is whole, prompt 1 keeps one page.
    assert_eq!(r.tree_pages(WorkerId(0)), 4);
    let two = [pw(0, 0, 0), pw(1, 0, 0)];
    let probe = |r: &mut PrefillRouter, p: &[u32]| r.route(p, &two, 3).unwrap().1;
    assert_eq!(probe(&mut r, &prompt(2, 3)), 3 * PAGE_TOKENS);
    assert_eq!(probe(&mut r, &prompt(1, 3)), PAGE_TOKENS);
    r.forget_worker(WorkerId(0));
    assert_eq!(r.tree_pages(WorkerId(0)), 0);
}

fn g(id: u32, outstanding_tokens: u64, pages_free: usize, running: usize) -> GroupLoad {
    GroupLoad {
        group: WorkerId(id),
        outstanding_tokens,
        pages_free,
        running,
        max_running: 4,
        alive: true,
    }
}

#[test]
fn exact_min_picks_fewest_outstanding_then_most_free_pages_then_id() {
    // (groups, pages needed, chosen)
    let dead = GroupLoad {
        alive: false,
        ..g(9, 0, 100, 0)
    };
    let cases = [
        (
            vec![g(0, 50, 10, 0), g(1, 20, 10, 0), g(2, 30, 10, 0)],
            1,
            Some(1),
        ),
        (
            vec![g(0, 20, 10, 0), g(1, 20, 11, 0), g(2, 20, 11, 0)],
            1,
            Some(1),
        ),
        (vec![g(0, 0, 1, 0), g(1, 99, 5, 0)], 2, Some(1)),
        (vec![g(0, 0, 10, 4), g(1, 99, 5, 3)], 1, Some(1)),
        (vec![dead, g(1, 99, 5, 3)], 1, Some(1)),
        (vec![dead, g(1, 0, 1, 0)], 2, None),
        (vec![], 0, None),
    ];
    for (groups, needed, want) in cases {
        let got = DecodeBalancer::new(BalancePolicy::ExactMin).route(&groups, needed);
        assert_eq!(got, want.map(WorkerId), "{groups:?}");
    }
}

#[test]
fn power_of_two_is_seeded_and_never_picks_the_worst_or_an_ineligible_group() {
    let groups: Vec<GroupLoad> = (0..6)
        .map(|i| g(i, 10 * i as u64, 10, if i == 0 { 4 } else { 0 }))
        .collect();
    let pick = |seed| {
        let mut b = DecodeBalancer::new(BalancePolicy::PowerOfTwo { seed });
        (0..200)
            .map(|_| b.route(&groups, 1).unwrap().0)
            .collect::<Vec<u32>>()
    };
    let a = pick(5);
    assert_eq!(a, pick(5), "same seed, same choices");
    assert_ne!(a, pick(6));
    assert!(!a.contains(&0), "group 0 is full");
    assert!(!a.contains(&5), "the worst group always loses its pair");
    assert!(
        a.contains(&1) && a.contains(&4),
        "choices spread over the pairs"
    );
    // One eligible group: no sampling needed.
    let mut b = DecodeBalancer::new(BalancePolicy::PowerOfTwo { seed: 1 });
    assert_eq!(b.route(&groups[..2], 1), Some(WorkerId(1)));
}

#[test]
fn the_default_policy_is_the_one_the_measurement_chose() {
    // The conclusion sentence in BalancePolicy's doc names the default; keep code and doc in step.
    let src = include_str!("../route.rs");
    let want = format!(
        "So [`BalancePolicy::{:?}`] is the default",
        BalancePolicy::default()
    );
    assert!(src.contains(&want), "BalancePolicy doc must say: {want}");
    assert_eq!(BalancePolicy::default(), BalancePolicy::ExactMin);
    for name in BalancePolicy::NAMES {
        assert_eq!(BalancePolicy::from_name(name, 3).unwrap().name(), name);
    }
    assert_eq!(BalancePolicy::from_name("random", 3), None);
}

#[test]
fn splitmix_below_stays_in_range() {
    let mut r = SplitMix64::new(0);
    for n in 1..50 {
        assert!(r.below(n) < n);
        let u = r.unit_f64();
        assert!((0.0..1.0).contains(&u));
    }
}

proptest! {
    #[test]
    fn decode_choice_is_always_eligible(
        loads in prop::collection::vec((0u64..100, 0usize..8, 0usize..5, any::<bool>()), 0..10),
        needed in 0usize..8,
        seed in any::<u64>(),
    ) {
        let groups: Vec<GroupLoad> = loads
            .iter()
            .enumerate()
            .map(|(i, &(o, p, r, alive))| GroupLoad { alive, ..g(i as u32, o, p, r) })
            .collect();
        let eligible = |w: WorkerId| groups.iter().any(|g| {
            g.group == w && g.alive && g.pages_free >= needed && g.running < g.max_running
        });
        let any = groups.iter().any(|g| eligible(g.group));
        for policy in [BalancePolicy::ExactMin, BalancePolicy::PowerOfTwo { seed }] {
            let got = DecodeBalancer::new(policy).route(&groups, needed);
            prop_assert_eq!(got.is_some(), any);
            if let Some(w) = got {
                prop_assert!(eligible(w));
            }
        }
    }
}

/// The router as it was before the shared index: one token-keyed trie per worker, each matched
/// separately. Kept as the oracle the indexed router must agree with, decision for decision.
mod oracle {
    use super::*;

    #[derive(Default)]
    pub struct Trie {
        nodes: Vec<Option<Node>>,
        free: Vec<u32>,
        leaves: BTreeSet<(u64, u32)>,
        pub len: usize,
    }

    struct Node {
        parent: u32,
        key: Vec<u32>,
        children: BTreeMap<Vec<u32>, u32>,
        last: u64,
    }

    impl Trie {
        fn root(&mut self) {
            if self.nodes.is_empty() {
                self.nodes.push(Some(Node {
                    parent: 0,
                    key: vec![],
                    children: BTreeMap::new(),
                    last: 0,
                }));
            }
        }
        fn n(&self, id: u32) -> &Node {
            self.nodes[id as usize].as_ref().unwrap()
        }
        fn nm(&mut self, id: u32) -> &mut Node {
            self.nodes[id as usize].as_mut().unwrap()
        }
        pub fn matched(&mut self, tokens: &[u32]) -> usize {
            self.root();
            let (mut at, mut n) = (0, 0);
            for key in tokens.chunks_exact(PAGE_TOKENS) {
                match self.n(at).children.get(key) {
                    Some(&c) => (at, n) = (c, n + 1),
                    None => break,
                }
            }
            n
        }
        pub fn insert(&mut self, tokens: &[u32], now: u64) {
            self.root();
            let mut at = 0;
            for key in tokens.chunks_exact(PAGE_TOKENS) {
                let next = match self.n(at).children.get(key) {
                    Some(&c) => c,
                    None => {
                        if at != 0 && self.n(at).children.is_empty() {
                            let k = (self.n(at).last, at);
                            self.leaves.remove(&k);
                        }
                        let node = Node {
                            parent: at,
                            key: key.to_vec(),
                            children: BTreeMap::new(),
                            last: 0,
                        };
                        let id = match self.free.pop() {
                            Some(id) => {
                                self.nodes[id as usize] = Some(node);
                                id
                            }
                            None => {
                                self.nodes.push(Some(node));
                                (self.nodes.len() - 1) as u32
                            }
                        };
                        self.nm(at).children.insert(key.to_vec(), id);
                        self.leaves.insert((0, id));
                        self.len += 1;
                        id
                    }
                };
                let old = self.n(next).last;
                let new = old.max(now);
                if self.n(next).children.is_empty() {
                    self.leaves.remove(&(old, next));
                    self.leaves.insert((new, next));
                }
                self.nm(next).last = new;
                at = next;
            }
        }
        pub fn trim(&mut self, max: usize) {
            while self.len > max {
                let Some((_, id)) = self.leaves.pop_first() else {
                    return;
                };
                let node = self.nodes[id as usize].take().unwrap();
                self.free.push(id);
                self.len -= 1;
                let parent = self.nm(node.parent);
                parent.children.remove(&node.key);
                let key = (parent.last, node.parent);
                if node.parent != 0 && parent.children.is_empty() {
                    self.leaves.insert(key);
                }
            }
        }
    }

    /// `PrefillRouter::route`'s decision rule over per-worker tries.
    pub fn route(
        cfg: &PrefillRouterConfig,
        trees: &mut BTreeMap<WorkerId, Trie>,
        tokens: &[u32],
        workers: &[PrefillLoad],
        now: u64,
    ) -> Option<(WorkerId, usize)> {
        let live: Vec<(&PrefillLoad, usize)> = workers
            .iter()
            .filter(|w| w.alive)
            .map(|w| {
                let m = trees
                    .get_mut(&w.worker)
                    .map_or(0, |t| t.matched(tokens) * PAGE_TOKENS);
                (w, m)
            })
            .collect();
        let least_queued = live.iter().map(|(w, _)| w.queued_tokens).min()?;
        let &(best, best_match) = live
            .iter()
            .max_by_key(|(w, m)| (*m, Reverse(w.queued_tokens), Reverse(w.worker)))?;
        let queued_max = cfg.balance_abs_tokens as f64 + cfg.balance_rel * least_queued as f64;
        let affinity = best_match > 0
            && best_match >= cfg.affinity_min_tokens
            && best.queued_tokens as f64 <= queued_max;
        let (chosen, m) = if affinity {
            (best.worker, best_match)
        } else {
            let (w, m) = live
                .iter()
                .min_by_key(|(w, _)| (w.queued_tokens, w.running, w.worker))?;
            (w.worker, *m)
        };
        let t = trees.entry(chosen).or_default();
        t.insert(tokens, now);
        t.trim(cfg.tree_pages_max);
        Some((chosen, m))
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// A prompt built from a path of page patterns (a small alphabet, so prefixes are shared), a
    /// tail length, and each worker's (queued, running, alive).
    Route(Vec<u8>, usize, Vec<(u64, usize, bool)>),
    Forget(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (
            prop::collection::vec(0u8..3, 0..7),
            0usize..PAGE_TOKENS,
            prop::collection::vec((0u64..3000, 0usize..4, prop::bool::weighted(0.9)), 0..5),
        )
            .prop_map(|(p, t, w)| Op::Route(p, t, w)),
        1 => (0u32..5).prop_map(Op::Forget),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The shared chain-hash index makes exactly the decisions per-worker tries make — same worker,
    /// same matched length, same tree sizes after LRU trimming — over random prompt trees, loads,
    /// bounds and departures.
    #[test]
    fn indexed_router_decides_like_per_worker_tries(
        ops in prop::collection::vec(op(), 1..80),
        pages_max in 1usize..12,
    ) {
        let cfg = PrefillRouterConfig {
            affinity_min_tokens: 2 * PAGE_TOKENS,
            balance_abs_tokens: 1000,
            balance_rel: 1.5,
            tree_pages_max: pages_max,
        };
        let mut router = PrefillRouter::new(cfg);
        let mut trees = BTreeMap::new();
        for (now, op) in ops.into_iter().enumerate() {
            // Strictly increasing time: equal LRU keys would be broken by node ids, which differ.
            let now = now as u64 + 1;
            match op {
                Op::Route(path, tail, loads) => {
                    // Page i of a path depends on the whole path so far (a tree of prompts).
                    let mut tokens = Vec::new();
                    let mut key = 0u32;
                    for &p in &path {
                        key = key * 7 + u32::from(p) + 1;
                        tokens.extend((0..PAGE_TOKENS as u32).map(|j| key * 1000 + j));
                    }
                    tokens.extend((0..tail as u32).map(|j| 9_000_000 + j));
                    let loads: Vec<PrefillLoad> = loads
                        .iter()
                        .enumerate()
                        .map(|(i, &(q, r, alive))| PrefillLoad { alive, ..pw(i as u32, q, r) })
                        .collect();
                    let got = router.route(&tokens, &loads, now);
                    let want = oracle::route(&cfg, &mut trees, &tokens, &loads, now);
                    prop_assert_eq!(got, want);
                }
                Op::Forget(w) => {
                    router.forget_worker(WorkerId(w));
                    trees.remove(&WorkerId(w));
                }
            }
            for w in 0..5 {
                let want = trees.get(&WorkerId(w)).map_or(0, |t| t.len);
                prop_assert_eq!(router.tree_pages(WorkerId(w)), want, "worker {}", w);
            }
        }
    }
}
