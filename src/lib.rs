//! narfs: a verified, lazily filled, read-only FUSE view of a Nix binary cache.
//!
//! The map: eight layers, in the order data flows through a mount. Each may use only
//! the layers before it (`tests/layers.rs` checks it, and that no two modules name
//! each other in a circle):
//!
//! | layer | owns | may use |
//! |---|---|---|
//! | [`formats`] | Nix's formats, narfs's file index and start-up profiles: parse, verify, write; no network | — |
//! | [`storage`] | everything that speaks a protocol: cache URLs, S3, http(s), files, netrc, TLS, `nix-cache-info` | formats |
//! | [`disk_cache`] | the cache directory: blobs by hash, the quota, trees and records | formats |
//! | [`fetch`] | the read side's network: narinfos, indexes, listings, NARs, blocks and profile packs, verified; pacing, retries, single-flight, decompression, counters | formats, storage, disk_cache |
//! | [`mount`] | the file system: inodes, operations, recordings and replays, the FUSE adapter (only it knows fuser), control socket, metrics endpoint | formats, storage, disk_cache, fetch |
//! | [`publish`] | the write side: `narfs push`, `narfs index`, `narfs profile push`, seekable NARs | formats, storage, fetch |
//! | [`nixstore`] | nix itself on the mount: overlayfs over it, paths registered with nix | formats, storage, disk_cache, fetch, mount |
//! | [`cli`] | the command line: one file per subcommand | all |
//!
//! A mount reads: cache URL → `storage` → `fetch` (verify, decompress, unpack) →
//! `disk_cache` → `mount` (inodes → fs → fuse). The write side never needs a mount.

// The layers in data-flow order (the blank lines keep rustfmt from sorting them).
pub mod formats;

pub mod storage;

pub mod disk_cache;

pub mod fetch;

pub mod mount;

pub mod publish;

pub mod nixstore;

pub mod cli;
