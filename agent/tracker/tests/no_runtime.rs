//! The hot path has no async runtime: the tracker crate's normal dependency
//! tree holds only crates reviewed for it (no tokio, async-std, smol,
//! futures, pollster or any other executor).

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
    // Every crate the hot path may reach, by name: a new one (an executor
    // such as futures-executor or pollster, or anything else) fails here
    // until it is reviewed and added.
    const ALLOWED: &[&str] = &[
        "wset-tracker",
        "libc",
        "thiserror",
        "thiserror-impl",
        "tracing",
        "tracing-attributes",
        "tracing-core",
        "once_cell",
        "pin-project-lite",
        "proc-macro2",
        "quote",
        "syn",
        "unicode-ident",
        // The userfaultfd crate (synchronous ioctl wrappers) and its own
        // dependencies; bindgen runs at build time only.
        "userfaultfd",
        "userfaultfd-sys",
        "nix",
        "bitflags",
        "cfg-if",
    ];
    let unexpected: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| !ALLOWED.contains(name))
        .collect();
    assert!(
        unexpected.is_empty(),
        "the tracker crate reaches crates not reviewed for the hot path: {unexpected:?}\n{tree}"
    );
}
