//! KV page transfer between prefill and decode workers.
