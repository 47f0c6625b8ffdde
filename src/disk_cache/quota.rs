//! The quota: bytes of blobs on disk, least recently used first, and bytes reserved
//! by writes under way. `total + reserved` is what the quota bounds, so it holds at
//! every moment, not only between fetches.

use crate::formats::hash::Sha256;
use std::time::{Duration, Instant};

/// A path fetched for a reader is not evicted before that reader used it, or had
/// `GRACE` to: else parallel readers with a small quota would evict each other's
/// blobs as soon as they land, and fetch them again, forever.
pub(super) const GRACE: Duration = Duration::from_secs(2);

pub(super) struct Usage {
    pub lru: lru::LruCache<Sha256, Held>,
    pub total: u64,
    pub reserved: u64,
    pub quota: u64,
    pub grace: Duration,
}

/// A blob's footprint on disk, and since when it waits for its first use.
pub(super) struct Held {
    pub size: u64,
    pub unused_since: Option<Instant>,
}

/// Why room could not be had: other writes hold it, or nothing could free it.
pub(super) enum Busy {
    Others,
    Alone,
}

impl Usage {
    pub fn new() -> Self {
        Usage {
            lru: lru::LruCache::unbounded(),
            total: 0,
            reserved: 0,
            quota: u64::MAX,
            grace: GRACE,
        }
    }

    /// Takes least recently used blobs (not pinned, not waiting for their first use)
    /// out of the account until `need` bytes are freed or none is left; returns them
    /// for deletion, and whether one was spared only for its grace (room will come).
    pub fn choose_victims(
        &mut self,
        need: u64,
        pinned: impl Fn(&Sha256) -> bool,
    ) -> (Vec<Sha256>, bool) {
        let mut victims = Vec::new();
        let mut graced = false;
        if need == 0 {
            return (victims, graced);
        }
        let mut freed = 0;
        let candidates: Vec<(Sha256, u64, bool)> = self
            .lru
            .iter()
            .rev()
            .map(|(k, v)| {
                let young = v.unused_since.is_some_and(|t| t.elapsed() < self.grace);
                (*k, v.size, young)
            })
            .collect();
        for (hash, size, young) in candidates {
            if freed >= need {
                break;
            }
            if pinned(&hash) {
                continue;
            }
            if young {
                graced = true;
                continue;
            }
            self.lru.pop(&hash);
            self.total -= size;
            freed += size;
            victims.push(hash);
        }
        (victims, graced)
    }
}

/// What the layer above knows about the blobs the disk cache may evict.
pub trait EvictionHooks: Send + Sync {
    /// Whether blob `hash` is in use (a file of it is open): it is never evicted.
    fn pinned(&self, hash: &Sha256) -> bool;
    /// Blob `hash` was evicted: nothing of it may be read from disk any more.
    fn evicted(&self, hash: &Sha256);
}

/// The quota has no room for what a prefetch wants without evicting.
#[derive(Debug, thiserror::Error)]
#[error("no room in the cache quota without evicting other files")]
pub struct NoRoom;

/// A reader waited its whole time budget for room that other fetches held.
#[derive(Debug, thiserror::Error)]
#[error("no room in the cache quota for {bytes} bytes: other fetches held it for {within:?} (--timeout); try again, or raise --cache-size")]
pub struct RoomTimeout {
    pub bytes: u64,
    pub within: std::time::Duration,
}

/// Room in the quota held for writes under way, returned when dropped.
pub struct Reservation {
    pub(super) disk: std::sync::Arc<super::DiskCache>,
    pub(super) bytes: u64,
    /// Whether growing it may evict other blobs (a demand) or must not (a prefetch).
    pub(super) may_evict: bool,
}

impl Reservation {
    /// Holds `bytes` more, evicting least recently used blobs for them when allowed.
    /// A demand that finds nothing left to evict goes over the quota (a path larger
    /// than the quota is still served); a prefetch fails instead.
    pub fn grow(&mut self, bytes: u64) -> Result<(), NoRoom> {
        self.disk.make_room(bytes, self.may_evict)?;
        self.bytes += bytes;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Spends `bytes` of it on a blob now written (growing it first if needed): they
    /// move from reserved to used.
    pub(super) fn spend(&mut self, bytes: u64) -> Result<(), NoRoom> {
        if self.bytes < bytes {
            self.grow(bytes - self.bytes)?;
        }
        self.bytes -= bytes;
        let mut u = self.disk.usage.lock().unwrap();
        u.reserved = u.reserved.saturating_sub(bytes);
        Ok(())
    }
}

impl Reservation {
    /// Takes back `bytes` spent on a write that failed.
    pub(super) fn refund(&mut self, bytes: u64) {
        self.bytes += bytes;
        self.disk.usage.lock().unwrap().reserved += bytes;
    }

    /// Takes back `bytes` spent on a blob since removed (and taken out of the total).
    pub(super) fn refund_spent(&mut self, bytes: u64) {
        self.refund(bytes);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut u = self.disk.usage.lock().unwrap();
        u.reserved = u.reserved.saturating_sub(self.bytes);
        drop(u);
        self.disk.room.notify_waiters();
    }
}

/// Bytes a blob of `len` bytes takes on disk (whole 4 KiB blocks).
pub fn footprint(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

pub(super) fn default_quota(root: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    const CAP: u64 = 10 << 30;
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
        return CAP;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return CAP;
    }
    (st.f_blocks as u64 * st.f_frsize as u64 / 10).min(CAP)
}

/// Parses `10G`, `500M`, `64K` or plain bytes (powers of 1024, as du and nix do).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "invalid size '{s}': unknown unit '{c}' (use K, M, G or T)"
                    ))
                }
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| {
            format!("invalid size '{s}': expected e.g. 10G, 500M or a number of bytes")
        })?;
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("500M").unwrap(), 500 << 20);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "G", "-1M", "10X", "ten"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(footprint(0), 0);
        assert_eq!(footprint(1), 4096);
        assert_eq!(footprint(4097), 8192);
    }
}
