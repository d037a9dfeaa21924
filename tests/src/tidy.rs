//! Tidy checks over the whole tree (rust-analyzer's habit): every Rust
//! file says what it is for in a `//!` header, `unsafe` code stands only in
//! files reviewed for it, and ARCHITECTURE.md names every module. They
//! read files only, so they run anywhere, as any user.

#![cfg(test)]

use std::path::{Path, PathBuf};

/// Files allowed to hold `unsafe` code, each for a reason of its own. A new
/// one fails the check until it is reviewed and added here (and named in
/// ARCHITECTURE.md's section on `unsafe`).
const UNSAFE_ALLOWED: &[&str] = &[
    // The hot path's kernel bindings and raw calls.
    "agent/tracker/src/uffd.rs",
    "agent/tracker/src/fdpass.rs",
    "agent/tracker/src/custody.rs",
    "agent/tracker/src/sys.rs",
    // glibc's malloc tuning in the controller binary.
    "controller/src/main.rs",
    // Test VMMs, guests and fixtures: mappings, KVM memory slots, raw fds.
    "agent/tracker/benches/fault_path.rs",
    "agent/tracker/tests/no_alloc.rs",
    "agent/tracker/tests/real_uffd.rs",
    "guest/src/kvm.rs",
    "guest/src/memory.rs",
    "demo/src/main.rs",
    "tests/tests/e2e/bad_input.rs",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_owned()
}

/// Every Rust source file of the project, relative to the root.
fn rust_files() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                if !matches!(name, "target" | ".git" | "corpus" | "artifacts") {
                    walk(root, &p, out);
                }
            } else if name.ends_with(".rs") {
                let rel = p.strip_prefix(root).expect("under the root");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let root = root();
    let mut out = Vec::new();
    for top in [
        "agent",
        "controller",
        "proto",
        "serve",
        "guest",
        "demo",
        "tests",
        "fuzz",
    ] {
        walk(&root, &root.join(top), &mut out);
    }
    assert!(out.len() > 50, "found only {} Rust files", out.len());
    out
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Whether a line, outside comments, uses `unsafe` code.
fn unsafe_code(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    let mut rest = code;
    while let Some(i) = rest.find("unsafe") {
        let before = rest[..i].chars().next_back();
        let after = rest[i + "unsafe".len()..].trim_start();
        let word_start = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        if word_start
            && ["{", "impl", "fn", "extern", "trait"]
                .iter()
                .any(|k| after.starts_with(k))
        {
            return true;
        }
        rest = &rest[i + "unsafe".len()..];
    }
    false
}

#[test]
fn every_file_starts_with_a_doc_header() {
    let missing: Vec<String> = rust_files()
        .into_iter()
        .filter(|f| !read(f).starts_with("//!"))
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` line saying what they are for: {missing:#?}"
    );
}

#[test]
fn unsafe_code_stands_only_where_reviewed() {
    let files = rust_files();
    let offending: Vec<String> = files
        .iter()
        // This file's own examples of what the detector sees are strings.
        .filter(|f| !UNSAFE_ALLOWED.contains(&f.as_str()) && f.as_str() != "tests/src/tidy.rs")
        .filter(|f| read(f).lines().any(unsafe_code))
        .cloned()
        .collect();
    assert!(
        offending.is_empty(),
        "`unsafe` code outside the reviewed files (move it into the tracker's sys.rs or a \
         binding, or review it and add the file to UNSAFE_ALLOWED): {offending:#?}"
    );
    let stale: Vec<&&str> = UNSAFE_ALLOWED
        .iter()
        .filter(|f| !files.iter().any(|g| g == **f) || !read(f).lines().any(unsafe_code))
        .collect();
    assert!(
        stale.is_empty(),
        "UNSAFE_ALLOWED names files without unsafe code (remove them): {stale:#?}"
    );
}

#[test]
fn the_unsafe_detector_sees_code_not_words() {
    assert!(unsafe_code("    let x = unsafe { f() };"));
    assert!(unsafe_code("unsafe impl Send for X {}"));
    assert!(unsafe_code("pub unsafe fn f() {}"));
    assert!(!unsafe_code("//! no `unsafe` here"));
    assert!(!unsafe_code("#![forbid(unsafe_code)]"));
    assert!(!unsafe_code("    x; // unsafe { in a comment }"));
    assert!(!unsafe_code("let not_unsafe {"));
}

#[test]
fn architecture_names_every_module() {
    let arch = read("ARCHITECTURE.md");
    let unnamed: Vec<String> = rust_files()
        .into_iter()
        .filter(|f| f.contains("/src/"))
        .filter(|f| {
            let p = Path::new(f);
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let name = p.file_name().and_then(|s| s.to_str()).unwrap_or("");
            match stem {
                // A crate root or a module's own file: named by its folder.
                "lib" | "main" | "mod" => {
                    let dir = p
                        .parent()
                        .and_then(|d| d.file_name())
                        .and_then(|d| d.to_str());
                    !dir.is_some_and(|d| arch.contains(&format!("{d}/")))
                }
                _ => !arch.contains(name) && !arch.contains(&format!("{stem}/")),
            }
        })
        .collect();
    assert!(
        unnamed.is_empty(),
        "ARCHITECTURE.md names none of these modules; say in its code map what each is for: \
         {unnamed:#?}"
    );
}

#[test]
fn the_readme_commands_are_what_ci_runs_and_need_no_sudo() {
    let readme = read("README.md");
    // The two commands, as the table's last cells give them.
    let commands: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("| **"))
        .filter_map(|l| l.trim_end_matches('|').rsplit('|').next())
        .map(|c| c.trim().trim_matches('`'))
        .collect();
    assert_eq!(
        commands,
        ["scripts/demo.sh", "scripts/test.sh"],
        "README's two commands"
    );
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "exec scripts/test.sh"),
        ".ci/run must run exactly the README's test command:\n{ci}"
    );
    // A root machine may have no sudo: the scripts re-run themselves
    // through it when needed, so no document tells anyone to type it.
    for doc in [
        "README.md",
        "ARCHITECTURE.md",
        "BENCHMARKS.md",
        "deploy/README.md",
    ] {
        let text = read(doc);
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("sudo scripts/"))
            .collect();
        assert!(bad.is_empty(), "{doc} tells readers to type sudo: {bad:#?}");
    }
    let lib = read("scripts/lib.sh");
    assert!(
        lib.contains("exec sudo"),
        "scripts/lib.sh's require_root no longer re-runs through sudo"
    );
}
