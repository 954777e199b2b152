//! CPU implementations: the f64 reference every GPU result is checked against, and
//! a fast multi-threaded path that is the fair baseline in benchmarks.
pub mod fast;
pub mod reference;
