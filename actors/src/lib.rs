//! The actor system and the OpenAI-compatible gateway.
