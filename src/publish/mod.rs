pub mod index;
pub mod push;
pub mod seekable;
