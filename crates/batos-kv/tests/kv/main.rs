//! Integration tests of batos-kv: one binary, one module per concern.

mod common;
mod model;
mod scenarios;
