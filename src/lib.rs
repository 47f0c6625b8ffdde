//! narfs: a verified, lazily filled, read-only FUSE view of a Nix binary cache.
//!
//! Data flows one way: cache URL → [`storage`] → [`fetch`] (verify, decompress, unpack)
//! → [`disk_cache`] → [`index`] → [`fs`] → [`fuse`]. Only `storage` knows S3 and files,
//! only `fuse` knows fuser.

pub mod formats;
