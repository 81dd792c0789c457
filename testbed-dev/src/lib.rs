//! Test-only helpers shared by the testbed's integration tests: starting real binaries and always
//! killing them (`testing`), and hostile traffic for robustness tests (`garbage`). Every crate
//! takes this as a `[dev-dependencies]` entry only, so none of it links into what ships.

pub mod garbage;
pub mod testing;
