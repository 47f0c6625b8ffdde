//! The write side: `narfs push` (closures from the local store to a cache),
//! `narfs index` (file indexes for paths already there), `narfs profile push`
//! (start-up packs) and the seekable NARs they write. May use `formats`, `storage`
//! and `fetch`'s streams and decoders; never `mount`.

pub mod index;
pub mod profile;
pub mod push;
pub mod seekable;
