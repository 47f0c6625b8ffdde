//! Nix's formats, narfs's file index and start-up profiles, each in its own strict
//! module; uses no other layer. No network here: everything parses from bytes or
//! streams (the NAR reader may unpack into a directory), tested against what the real Nix wrote.

pub mod file_index;
pub mod hash;
pub mod keys;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod object_key;
pub mod profile;
pub mod store_path;
