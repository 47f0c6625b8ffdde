//! Heap bytes the index spends per known-but-unopened store path, counted exactly
//! with a counting allocator (RSS figures include allocator slack and the runtime).
//! Run: `cargo bench --bench index_memory`.

use narfs::formats::store_path::StorePath;
use narfs::mount::inodes::Index;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn main() {
    let n = 100_000;
    let paths: Vec<StorePath> = (0..n)
        .map(|i| {
            let h = narfs::formats::hash::Sha256::digest(format!("p{i}").as_bytes());
            let hash = narfs::formats::nixbase32::encode(&h.0[..20]);
            // a typical name length (nixpkgs median is about 20 characters)
            StorePath::from_basename(&format!("{hash}-python3.12-requests-2.3")).unwrap()
        })
        .collect();
    let before = LIVE.load(Ordering::Relaxed);
    let index = Index::default();
    for p in &paths {
        index.add_path(p);
    }
    let after = LIVE.load(Ordering::Relaxed);
    println!(
        "index: {n} known store paths (names of {} bytes) hold {} heap bytes: {:.0} bytes per path",
        paths[0].basename().len(),
        after - before,
        (after - before) as f64 / n as f64
    );
    assert_eq!(index.path_count(), n);
}
