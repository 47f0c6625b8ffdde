//! The mounted file system: inodes, file system operations, the FUSE adapter, the
//! control socket and the metrics endpoint, and the session that wires them up.
//! May use `formats`, `storage`, `disk_cache` and `fetch`; only `fuse` knows fuser.

pub mod control;
pub mod fs;
pub mod fuse;
pub mod inodes;
pub mod metrics;
pub mod session;
