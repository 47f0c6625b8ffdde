pub mod control;
pub mod fs;
pub mod fuse;
pub mod inodes;
pub mod session;
