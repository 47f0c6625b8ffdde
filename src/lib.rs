pub mod cli;
pub mod disk_cache;
pub mod fetch;
pub mod formats;
pub mod mount;
pub mod publish;
pub mod storage;
