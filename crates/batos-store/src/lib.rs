//! batos-store: see docs/ARCHITECTURE.md.
