//! The write side: `narfs push` (closures from the local store to a cache),
//! `narfs index` (file indexes for paths already there) and the seekable NARs both
//! write. May use `formats`, `storage` and `fetch`'s streams and decoders; never `mount`.

pub mod index;
pub mod push;
pub mod seekable;
