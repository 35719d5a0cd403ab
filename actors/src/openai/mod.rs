//! The OpenAI-compatible API's pure parts: request and response types with validation, and the
//! text-stream processors the gateway chains per request (detokenizer → stop strings → reasoning
//! separation → tool-call parsing). No IO here: the gateway actor owns the sockets.
pub mod detok;
pub mod protocol;
pub mod reasoning;
pub mod sse;
pub mod stop;
pub mod tools;
