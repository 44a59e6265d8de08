//! batos-kv: see docs/ARCHITECTURE.md.
