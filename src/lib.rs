//! narfs: a verified, lazily filled, read-only FUSE view of a Nix binary cache.
//!
//! Data flows one way: cache URL → [`storage`] → [`fetch`] (verify, decompress, unpack)
//! → [`disk_cache`] → [`index`] → [`fs`] → [`fuse`]. Only `storage` knows S3 and files,
//! only `fuse` knows fuser.

pub mod beneath;
pub mod blocks;
pub mod cache_url;
pub mod control;
pub mod decompress;
pub mod disk_cache;
pub mod fetch;
pub mod formats;
pub mod fs;
pub mod fuse;
pub mod helper;
pub mod index;
pub mod inspect;
pub mod metrics;
pub mod mount;
pub mod pace;
pub mod push;
pub mod retry;
pub mod seekable;
pub mod singleflight;
pub mod storage;
pub mod upgrade;
