//! The OpenAI-compatible API's pure parts: request and response types with validation, and the
//! text-stream processors the gateway chains per request (detokenizer → stop strings → reasoning
//! separation → tool-call parsing), and the client-side SSE parser the load generator and the
//! tests read streams with. No IO and no actor code here: the gateway (duet-actors) owns the
//! sockets.
pub mod detok;
pub mod grammar;
pub mod protocol;
pub mod reasoning;
pub mod sse;
pub mod stop;
pub mod tools;
