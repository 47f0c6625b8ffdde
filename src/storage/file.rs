//! `file:///DIR` caches, as `nix copy --to file://` writes them.

use super::{Body, ListPage, Storage, StorageError};
use async_trait::async_trait;
use std::io::ErrorKind;
use std::path::PathBuf;

pub struct FileStorage {
    root: PathBuf,
}

impl FileStorage {
    pub fn new(root: PathBuf) -> Self {
        FileStorage { root }
    }
}

#[async_trait]
impl Storage for FileStorage {
    async fn get(&self, key: &str) -> Result<Option<Body>, StorageError> {
        match tokio::fs::File::open(self.root.join(key)).await {
            Ok(f) => Ok(Some(Box::pin(f))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StorageError {
                op: "open",
                location: self.location(key),
                detail: e.to_string(),
            }),
        }
    }

    async fn list_page(&self, _token: Option<String>) -> Result<ListPage, StorageError> {
        let err = |e: std::io::Error| StorageError {
            op: "list",
            location: self.root.display().to_string(),
            detail: e.to_string(),
        };
        let mut rd = tokio::fs::read_dir(&self.root).await.map_err(err)?;
        let mut keys = Vec::new();
        while let Some(e) = rd.next_entry().await.map_err(err)? {
            if let Ok(name) = e.file_name().into_string() {
                keys.push(name);
            }
        }
        keys.sort();
        Ok(ListPage { keys, next: None })
    }

    fn location(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}
