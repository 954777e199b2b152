//! The benchmark report of `src/main.rs` (part of the binary, not of the library).

pub mod data;
pub mod measure;
pub mod output;
pub mod svg;
pub mod timing;

/// Errors of the report: the library's, wgpu's, I/O.
pub type BoxResult<T> = Result<T, Box<dyn std::error::Error>>;
