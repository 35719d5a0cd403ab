//! The actor system and the OpenAI-compatible gateway: `Gateway` (HTTP, routing), `PrefillWorker`s,
//! `DecodeWorker`s (one per DP-attention group), a `Registry` of live workers and their load, and
//! the supervisor that restarts failed workers. `serve` assembles them into the one-process
//! cluster of `duet serve`.

pub mod clock;
pub mod cluster;
pub mod dataplane;
pub mod decode;
pub mod engine;
pub mod ep;
pub mod gateway;
pub mod metrics;
pub mod prefill;
pub mod protocol;
pub mod registry;
pub mod remote;
pub mod seq;
pub mod serve;
pub mod trace;
pub mod worker;
