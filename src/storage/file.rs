//! `file:///DIR` caches, as `nix copy --to file://` writes them.

use super::{Body, ListPage, Storage, StorageError, Upload};
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
        self.get_range(key, 0, u64::MAX).await
    }

    async fn get_range(
        &self,
        key: &str,
        offset: u64,
        len: u64,
    ) -> Result<Option<Body>, StorageError> {
        super::check_key(self, "open", key)?;
        // no symlink under the cache root is followed (nix never writes one there):
        // a link to /etc/shadow would be read as a NAR otherwise
        use std::os::unix::ffi::OsStrExt;
        let err = |detail: String| StorageError {
            op: "open",
            location: self.location(key),
            detail,
        };
        let (Ok(root), Ok(rel)) = (
            std::ffi::CString::new(self.root.as_os_str().as_bytes()),
            std::ffi::CString::new(key),
        ) else {
            return Err(err("a name with a NUL byte".into()));
        };
        let opened = tokio::task::spawn_blocking(move || {
            let fd = crate::storage::beneath::open_beneath(&root, &rel, true);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            use std::io::Seek;
            use std::os::fd::FromRawFd;
            let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
            f.seek(std::io::SeekFrom::Start(offset))?;
            Ok(f)
        })
        .await
        .map_err(|e| err(e.to_string()))?;
        use tokio::io::AsyncReadExt;
        match opened {
            Ok(f) => Ok(Some(Box::pin(tokio::fs::File::from_std(f).take(len)))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Err(err(
                "it is (or passes through) a symlink, which narfs never follows in a cache".into(),
            )),
            Err(e) => Err(err(e.to_string())),
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

    async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        super::check_key(self, "stat", key)?;
        match tokio::fs::symlink_metadata(self.root.join(key)).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StorageError {
                op: "stat",
                location: self.location(key),
                detail: e.to_string(),
            }),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        super::check_key(self, "remove", key)?;
        match tokio::fs::remove_file(self.root.join(key)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError {
                op: "remove",
                location: self.location(key),
                detail: e.to_string(),
            }),
        }
    }

    async fn put(&self, key: &str, data: Upload, _content_type: &str) -> Result<(), StorageError> {
        super::check_key(self, "write", key)?;
        let dest = self.root.join(key);
        let err = |e: std::io::Error| StorageError {
            op: "write",
            location: self.location(key),
            detail: e.to_string(),
        };
        let dir = dest.parent().unwrap_or(&self.root).to_owned();
        tokio::fs::create_dir_all(&dir).await.map_err(err)?;
        tokio::task::spawn_blocking(move || {
            let mut tmp = tempfile::NamedTempFile::new_in(&dir)?;
            match data {
                Upload::Bytes(b) => std::io::Write::write_all(&mut tmp, &b)?,
                Upload::File(p) => {
                    std::io::copy(&mut std::fs::File::open(p)?, &mut tmp)?;
                }
            }
            // readable by a web server or another user, as nix writes it
            use std::os::unix::fs::PermissionsExt;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o644))?;
            tmp.as_file().sync_all()?;
            tmp.persist(&dest).map_err(|e| e.error)?;
            Ok(())
        })
        .await
        .map_err(|e| err(std::io::Error::other(e)))?
        .map_err(err)
    }
}
