//! Nix's formats, each in its own strict module. No I/O here: everything parses from
//! bytes or streams so that it can be tested against fixtures written by the real Nix.

pub mod file_index;
pub mod hash;
pub mod keys;
pub mod listing;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod object_key;
pub mod store_path;
