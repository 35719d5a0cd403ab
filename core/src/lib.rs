//! Sans-IO serving policies (../DESIGN.md "Sans-IO core"): no tokio, no sockets, no clocks.
//! Time comes in as an argument (`now_us`), decisions come out as data.
//!
//! - [`types`]: identifiers shared by every policy.
//! - [`config`]: the cluster config schema (TOML).
//! - [`kv`]: one worker's KV page allocator and radix prefix cache.
//! - [`sched`]: one worker's continuous-batching scheduler.
//! - [`route`]: gateway-side prefill routing and decode DP-group balancing.
//! - [`pd`]: the prefill/decode protocol of a decode group and a prefill worker, and the context limit.
//! - [`eplb`]: expert placement and redundant copies for an EP group, from expert load.
//! - [`rng`]: the seeded generator every crate draws from (sampling, checkpoints, simulation).

pub mod config;
pub mod ep;
pub mod eplb;
pub mod kv;
pub mod pd;
pub mod rng;
pub mod route;
pub mod sched;
pub mod types;

/// Tokens per KV page: FlashMLA's page size, which the dense V3/R1 decode kernel requires.
pub const PAGE_TOKENS: usize = 64;

/// Pages needed to hold `tokens` tokens.
pub const fn pages_for(tokens: usize) -> usize {
    tokens.div_ceil(PAGE_TOKENS)
}
