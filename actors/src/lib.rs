//! The actor system and the OpenAI-compatible gateway.
pub mod openai;
