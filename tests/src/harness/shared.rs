//! Fixtures shared by the tests of one binary: `Shared<T>` starts its
//! value (an agent, say, with its guests) on first use and keeps it for the
//! process's life. Tests that share one must stay independent: unique VM
//! ids, no assertion on what other tests add, no ordering.
//!
//! Teardown is the kernel's: a shared fixture is started on a thread of
//! its own that never exits, and every process it spawns runs under
//! `setpriv --pdeathsig KILL`, so when the test binary exits (however it
//! exits) that thread goes and the processes are killed with it. Their
//! scratch directories are removed by a small reaper process that waits
//! for the test binary's end on a pipe.

use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

thread_local! {
    /// Set on a shared fixture's own thread: what it spawns dies with it.
    static SHARED: Cell<bool> = const { Cell::new(false) };
}

/// A value started on first use and shared by every test of the binary.
pub struct Shared<T> {
    cell: OnceLock<T>,
    start: fn() -> T,
}

impl<T> std::fmt::Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("started", &self.cell.get().is_some())
            .finish()
    }
}

impl<T: Send + Sync + 'static> Shared<T> {
    pub const fn new(start: fn() -> T) -> Self {
        Self {
            cell: OnceLock::new(),
            start,
        }
    }

    /// The fixture, started now if no test has used it yet.
    pub fn get(&'static self) -> &'static T {
        self.cell.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let start = self.start;
            std::thread::Builder::new()
                .name("shared-fixture".into())
                .spawn(move || {
                    SHARED.set(true);
                    let _ = tx.send(std::panic::catch_unwind(start));
                    // The processes started here die with this thread (their
                    // parent-death signal), so it lives as long as the binary.
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawn the shared fixture's thread");
            match rx.recv().expect("the shared fixture's thread") {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }
}

/// A command for `program`: as it is, or, on a shared fixture's thread,
/// under `setpriv --pdeathsig KILL` so it dies with the test binary.
pub(super) fn command(program: PathBuf) -> Command {
    if SHARED.get() {
        let mut c = Command::new("setpriv");
        c.args(["--pdeathsig", "KILL", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Note a child spawned by `command`: on a shared fixture's thread the
/// reaper waits for it to be gone before it removes the directories.
pub(super) fn note(child: &Child) {
    if SHARED.get() {
        reap_at_exit(&child.id().to_string());
    }
}

/// Remove `dir` when the test binary exits, if it belongs to a shared
/// fixture (other scratch directories go with their owner's drop).
pub(super) fn remove_at_exit(dir: &Path) {
    if SHARED.get() {
        reap_at_exit(&dir.display().to_string());
    }
}

/// Hand the reaper a directory (absolute) or a pid.
fn reap_at_exit(line: &str) {
    static REAPER: Mutex<Option<(Child, ChildStdin)>> = Mutex::new(None);
    let mut r = REAPER.lock().unwrap_or_else(|e| e.into_inner());
    if r.is_none() {
        // Reads directories and pids until the pipe closes (the test binary
        // has exited), waits (boundedly) for those processes to be gone, and
        // removes the directories.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(
                r#"while IFS= read -r l; do
                     case $l in /*) set -- "$@" "$l" ;; *) pids="$pids $l" ;; esac
                   done
                   for p in $pids; do
                     n=0
                     while kill -0 "$p" 2>/dev/null && [ $n -lt 600 ]; do
                       sleep 0.05; n=$((n + 1))
                     done
                   done
                   rm -rf -- "$@""#,
            )
            .arg("wset-test-reaper")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the shared fixtures' directory reaper");
        let stdin = child.stdin.take().expect("reaper stdin");
        *r = Some((child, stdin));
    }
    if let Some((_, stdin)) = r.as_mut() {
        let _ = writeln!(stdin, "{line}");
        let _ = stdin.flush();
    }
}
