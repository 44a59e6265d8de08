//! batos-model: see docs/ARCHITECTURE.md.
