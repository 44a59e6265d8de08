//! batos-kernels: see docs/ARCHITECTURE.md.
