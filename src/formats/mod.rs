//! Nix's formats and narfs's file index, each in its own strict module; uses no other
//! layer. No network here: everything parses from bytes or streams (the NAR reader
//! may unpack into a directory) so that it is tested against fixtures the real Nix wrote.

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
