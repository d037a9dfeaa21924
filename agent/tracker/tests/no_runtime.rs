//! The hot path has no async runtime: nothing in the tracker crate's normal
//! dependency tree may be tokio, async-std, smol or futures.

#[test]
fn tracker_depends_on_no_async_runtime() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "wset-tracker",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.contains("wset-tracker"),
        "unexpected cargo tree output: {tree}"
    );
    for banned in ["tokio", "async-std", "smol", "futures", "async-io"] {
        let hit = tree
            .lines()
            .find(|l| l.split_whitespace().next() == Some(banned));
        assert!(
            hit.is_none(),
            "the tracker crate pulls in {banned}: {hit:?}\n{tree}"
        );
    }
}
