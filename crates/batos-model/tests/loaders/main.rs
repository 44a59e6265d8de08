//! Loaders offline, on tiny synthetic models built in code: config parsing, GGUF import,
//! safetensors, tokenizer and chat template, and every kind of bad input as a typed error.

mod config;
mod gguf_model;
mod safetensors;
mod synth;
mod tokenizer;
