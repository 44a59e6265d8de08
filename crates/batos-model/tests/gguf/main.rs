//! The GGUF reader, writer and dequantization, offline on files built in code.

mod dequant;
mod file;
