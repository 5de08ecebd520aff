//! The stand-in passes the check gatevm makes of a supplied k3s binary (`--k3s PATH`, `setup
//! --k3s`): a regular executable ELF that answers `--version` like k3s, as gatevm parses it.

/// What `start --k3s fake-k3s` does with it: copied into the cache by hash, the copy checked and
/// its version read. The end-to-end test (crates/cli/tests/k3s.rs) expects `status` to report
/// this version.
#[test]
fn gatevm_takes_it_for_k3s_and_reads_its_version() {
    let fake = std::path::Path::new(env!("CARGO_BIN_EXE_fake-k3s"));
    let cache = tempfile::tempdir().unwrap();
    let b = gatevm_k3s::binary::import(fake, cache.path()).unwrap();
    assert_eq!(b.version, "v1.31.0+k3s1");
    assert_eq!(
        b.path,
        gatevm_k3s::binary::supplied_dir(cache.path())
            .join(&b.sha256)
            .join("k3s")
    );
    assert_eq!(
        std::fs::read(&b.path).unwrap(),
        std::fs::read(fake).unwrap()
    );
}
