//! Property tests and bounded fuzzing of the parsers (run in CI): random trees round
//! trip through the NAR writer and our unpacker; random mutations of real archives,
//! narinfos and listings never panic, and never unpack to anything but the verified
//! tree.

mod common;

use narfs::formats::file_index::{Block, BlockCompression, FileIndex};
use narfs::formats::hash::Sha256;
use narfs::formats::listing::parse_ls;
use narfs::formats::nar;
use narfs::formats::narinfo::{Compression, NarInfo};
use narfs::formats::store_path::StorePath;
use proptest::prelude::*;
use std::path::Path;

#[derive(Debug, Clone)]
enum Node {
    File(Vec<u8>, bool),
    Link(String),
    Dir(Vec<(String, Node)>),
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 0..300),
                1 => proptest::collection::vec(any::<u8>(), 4000..12000),
            ],
            any::<bool>()
        )
            .prop_map(|(d, x)| Node::File(d, x)),
        "[a-z./]{1,20}".prop_map(Node::Link),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        proptest::collection::btree_map("[a-zA-Z0-9 ._ü-]{1,12}", inner, 0..6).prop_map(|m| {
            Node::Dir(
                m.into_iter()
                    .filter(|(k, _)| k != "." && k != "..")
                    .collect(),
            )
        })
    })
}

/// The key the indexes of these properties are signed with.
fn signer() -> narfs::formats::keys::SecretKey {
    narfs::formats::keys::SecretKey::from_seed("prop-1", [1; 32])
}

fn trusting(sk: &narfs::formats::keys::SecretKey) -> narfs::formats::keys::TrustedKeys {
    let mut keys = narfs::formats::keys::TrustedKeys::default();
    keys.add(sk.public());
    keys
}

/// `tree` made at `dir`, and its NAR.
fn made(tree: &Node, dir: &Path) -> Vec<u8> {
    materialize(tree, dir);
    nar::Writer::new(Vec::new()).dump_path(dir).unwrap()
}

/// A file index of `nar` (one uncompressed block), 4 KiB chunks, signed with `sk`.
fn index_of(nar: &[u8], sk: &narfs::formats::keys::SecretKey) -> (FileIndex, Vec<u8>) {
    let mut root = nar::parse(&mut &nar[..], &mut nar::TreeOnly, 12).unwrap();
    // the index stores no offsets: the parse must find the ones lay_out derives
    assert_eq!(nar::lay_out(&mut root), nar.len() as u64);
    let index = FileIndex {
        store_path: StorePath::from_basename("00000000000000000000000000000000-p").unwrap(),
        nar_hash: Sha256::digest(nar),
        nar_size: nar.len() as u64,
        url: "nar/p.nar".into(),
        compression: BlockCompression::None,
        file_size: nar.len() as u64,
        file_hash: Sha256::digest(nar),
        chunk_shift: 12,
        blocks: vec![Block {
            comp_offset: 0,
            comp_len: nar.len() as u32,
            nar_offset: 0,
            nar_len: nar.len() as u32,
        }],
        root,
    };
    let bytes = index.to_bytes(&[sk]);
    (index, bytes)
}

fn materialize(n: &Node, p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    match n {
        Node::File(d, x) => {
            std::fs::write(p, d).unwrap();
            std::fs::set_permissions(
                p,
                std::fs::Permissions::from_mode(if *x { 0o755 } else { 0o644 }),
            )
            .unwrap();
        }
        Node::Link(t) => std::os::unix::fs::symlink(t, p).unwrap(),
        Node::Dir(es) => {
            std::fs::create_dir(p).unwrap();
            for (k, v) in es {
                materialize(v, &p.join(k));
            }
        }
    }
}

fn info_for(nar: &[u8]) -> NarInfo {
    let sp = StorePath::from_basename("00000000000000000000000000000000-p").unwrap();
    common::narinfo_of(&sp, "nar/x", Compression::None, nar, None)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(tree in node()) {
        let d = tempfile::tempdir().unwrap();
        let bytes = made(&tree, &d.path().join("src"));
        let entry = nar::unpack(&mut &bytes[..], &d.path().join("dst")).unwrap();
        let again = nar::Writer::new(Vec::new()).dump_path(&d.path().join("dst")).unwrap();
        prop_assert_eq!(&bytes, &again);
        let verified = narfs::fetch::unpack::unpack_verified(&bytes[..], &info_for(&bytes), &d.path().join("v")).unwrap();
        prop_assert!(verified.same_shape(&entry));
    }

    #[test]
    fn mutated_nars_never_panic_and_never_pass_verification(
        tree in node(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let d = tempfile::tempdir().unwrap();
        let bytes = made(&tree, &d.path().join("src"));
        let info = info_for(&bytes);
        let mut m = bytes.clone();
        for (i, b) in &edits {
            let at = i.index(m.len());
            m[at] = *b;
        }
        let _ = nar::unpack(&mut &m[..], &d.path().join("raw"));
        let out = d.path().join("checked");
        match narfs::fetch::unpack::unpack_verified(&m[..], &info, &out) {
            Ok(_) => prop_assert_eq!(&m, &bytes, "a changed archive passed verification"),
            Err(_) => prop_assert!(m != bytes),
        }
        // nothing was written next to the destinations
        for e in std::fs::read_dir(d.path()).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            prop_assert!(["src", "raw", "checked"].contains(&n.as_str()), "{}", n);
        }
    }

    #[test]
    fn narinfo_parser_never_panics(text in "(StorePath|URL|NarHash|NarSize|References|Sig|FileSize|Compression|X)?: ?[ -~\u{80}-\u{10ffff}]{0,80}(\n[ -~]{0,60}){0,8}") {
        if let Ok(i) = NarInfo::parse(&text) {
            let _ = i.fingerprint();
            let _ = NarInfo::parse(&i.to_text());
        }
    }

    #[test]
    fn listing_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_ls(&bytes, 1000);
    }
}

/// Bounded mutation fuzzing of the real-nix fixtures: narinfos and `.ls` files.
#[test]
fn mutations_of_real_narinfos_and_listings_never_panic_or_verify() {
    let f = common::fixture();
    let mut keys = narfs::formats::keys::TrustedKeys::default();
    keys.add(narfs::formats::keys::PublicKey::parse(&f.public_key).unwrap());
    let mut x: u64 = 12345;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for name in f.paths.keys() {
        let ni = f.narinfo(name).into_bytes();
        let ls = std::fs::read(f.cache.join(format!("{}.ls", f.hash(name)))).unwrap();
        let good = NarInfo::parse_bytes(&ni).unwrap();
        for _ in 0..3000 {
            let mut m = ni.clone();
            for _ in 0..1 + rnd() % 3 {
                let at = (rnd() as usize) % m.len();
                m[at] = rnd() as u8;
            }
            if let Ok(i) = NarInfo::parse_bytes(&m) {
                if i.verify(f.hash(name), &keys).is_ok() {
                    // only unsigned fields may differ
                    assert_eq!(
                        i.fingerprint(),
                        good.fingerprint(),
                        "{}",
                        String::from_utf8_lossy(&m)
                    );
                }
            }
            let mut l = ls.clone();
            let at = (rnd() as usize) % l.len();
            l[at] = rnd() as u8;
            let _ = parse_ls(&l, good.nar_size);
        }
    }
}

/// Every chunk of every file of `e`, by hash.
fn chunks_of(
    dir: &Path,
    e: &narfs::formats::listing::Entry,
    out: &mut std::collections::HashMap<Sha256, Vec<u8>>,
) {
    use narfs::formats::listing::Entry;
    match e {
        Entry::Regular { chunks, .. } => {
            let data = std::fs::read(dir).unwrap();
            for (c, h) in data.chunks(4096).zip(chunks.as_deref().unwrap()) {
                assert_eq!(Sha256::digest(c), *h);
                out.insert(*h, c.to_vec());
            }
        }
        Entry::Directory { entries } => {
            for (n, c) in entries {
                chunks_of(&dir.join(std::str::from_utf8(n).unwrap()), c, out);
            }
        }
        Entry::Symlink { .. } => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// index -> NAR: the tree and chunks of a verified index rebuild the very NAR
    /// (it hashes to NarHash), and the index survives its own serialisation.
    #[test]
    fn file_index_round_trips_with_its_nar(tree in node()) {
        let d = tempfile::tempdir().unwrap();
        let (src, sk, keys) = (d.path().join("t"), signer(), trusting(&signer()));
        let (index, bytes) = index_of(&made(&tree, &src), &sk);
        let (back, _) = FileIndex::parse_verified(&bytes, &index.store_path, &index.nar_hash, index.nar_size, &keys).unwrap();
        prop_assert_eq!(&back, &index);
        let mut store = std::collections::HashMap::new();
        chunks_of(&src, &back.root, &mut store);
        let rebuilt = nar::Writer::new(Vec::new())
            .dump_entry(&back.root, &mut |hashes| {
                Ok(hashes.iter().flat_map(|h| store[h].clone()).collect())
            })
            .unwrap();
        prop_assert_eq!(Sha256::digest(&rebuilt), index.nar_hash);
    }

    /// Any byte of a signed index changed, any truncation: it never verifies, and the
    /// parser never panics.
    #[test]
    fn mutated_file_indexes_never_verify(tree in node(), at in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<prop::sample::Index>()) {
        let d = tempfile::tempdir().unwrap();
        let keys = trusting(&signer());
        let (index, bytes) = index_of(&made(&tree, &d.path().join("t")), &signer());
        let verify = |b: &[u8]| FileIndex::parse_verified(b, &index.store_path, &index.nar_hash, index.nar_size, &keys);
        let mut flipped = bytes.clone();
        let i = at.index(flipped.len());
        flipped[i] ^= 1 << bit;
        prop_assert!(verify(&flipped).is_err(), "byte {} bit {} flipped and it verified", i, bit);
        let n = cut.index(bytes.len());
        prop_assert!(verify(&bytes[..n]).is_err());
        let mut longer = bytes.clone();
        longer.push(b'\n');
        prop_assert!(verify(&longer).is_err());
    }

    #[test]
    fn file_index_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let keys = narfs::formats::keys::TrustedKeys::default();
        let sp = StorePath::from_basename("00000000000000000000000000000000-p").unwrap();
        let mut text = b"NarfsIndex: 1\nStorePath: /nix/store/00000000000000000000000000000000-p\n".to_vec();
        text.extend_from_slice(&bytes);
        let _ = FileIndex::parse_verified(&bytes, &sp, &Sha256::digest(b""), 100, &keys);
        let _ = FileIndex::parse_verified(&text, &sp, &Sha256::digest(b""), 100, &keys);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A trusted signer's malformed body (any byte changed, cut or extended, then
    /// signed): never a panic; if it still verifies, it is a consistent index.
    #[test]
    fn signed_but_malformed_bodies_never_panic(tree in node(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let d = tempfile::tempdir().unwrap();
        let (sk, keys) = (signer(), trusting(&signer()));
        let (index, _) = index_of(&made(&tree, &d.path().join("t")), &sk);
        let body = index.body();
        let mut changed = body.clone();
        let i = at.index(changed.len());
        changed[i] = byte;
        let n = cut.index(body.len());
        for b in [changed, body[..n].to_vec(), [&body[..], &[byte]].concat()] {
            let bytes = narfs::formats::file_index::encode(&index.store_path, &index.nar_hash, index.nar_size, &b, &[&sk]);
            if let Ok((x, _)) = FileIndex::parse_verified(&bytes, &index.store_path, &index.nar_hash, index.nar_size, &keys) {
                let mut root = x.root.clone();
                prop_assert_eq!(nar::lay_out(&mut root), index.nar_size);
                prop_assert_eq!(x.blocks.iter().map(|b| b.nar_len as u64).sum::<u64>(), index.nar_size);
            }
        }
    }
}
