//! Property tests and bounded fuzzing of the parsers (run in CI): random trees round
//! trip through the NAR writer and our unpacker; random mutations of real archives,
//! narinfos and listings never panic, and never unpack to anything but the verified
//! tree.

mod common;

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
            proptest::collection::vec(any::<u8>(), 0..300),
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
    NarInfo {
        store_path: StorePath::from_basename("00000000000000000000000000000000-p").unwrap(),
        url: "nar/x".into(),
        compression: Compression::None,
        file_hash: None,
        file_size: None,
        nar_hash: Sha256::digest(nar),
        nar_size: nar.len() as u64,
        references: vec![],
        deriver: None,
        sigs: vec![],
        ca: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_round_trip(tree in node()) {
        let d = tempfile::tempdir().unwrap();
        materialize(&tree, &d.path().join("src"));
        let bytes = nar::Writer::new(Vec::new()).dump_path(&d.path().join("src")).unwrap();
        let entry = nar::unpack(&mut &bytes[..], &d.path().join("dst")).unwrap();
        let again = nar::Writer::new(Vec::new()).dump_path(&d.path().join("dst")).unwrap();
        prop_assert_eq!(&bytes, &again);
        let verified = narfs::fetch::unpack_verified(&bytes[..], &info_for(&bytes), &d.path().join("v")).unwrap();
        prop_assert!(verified.same_shape(&entry));
    }

    #[test]
    fn mutated_nars_never_panic_and_never_pass_verification(
        tree in node(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let d = tempfile::tempdir().unwrap();
        materialize(&tree, &d.path().join("src"));
        let bytes = nar::Writer::new(Vec::new()).dump_path(&d.path().join("src")).unwrap();
        let info = info_for(&bytes);
        let mut m = bytes.clone();
        for (i, b) in &edits {
            let at = i.index(m.len());
            m[at] = *b;
        }
        let _ = nar::unpack(&mut &m[..], &d.path().join("raw"));
        let out = d.path().join("checked");
        match narfs::fetch::unpack_verified(&m[..], &info, &out) {
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
