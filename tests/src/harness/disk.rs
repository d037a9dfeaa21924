//! A small tmpfs in a mount namespace of its own, for a store that must
//! run out of disk.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A tmpfs of `mib` MiB mounted on `dir` in a mount namespace that only a
/// helper process (and what reaches through its `/proc/<pid>/root`) sees.
/// Gone with the helper.
#[derive(Debug)]
pub struct SmallDisk {
    helper: Child,
}

impl SmallDisk {
    pub fn mount(dir: &std::path::Path, mib: u64) -> Self {
        let mut helper = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size="$1"m wset-small "$0" && echo mounted && exec sleep 100000"#)
            .arg(dir)
            .arg(mib.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) is needed to give the store a small disk of its own");
        let mut line = String::new();
        BufReader::new(helper.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.trim() != "mounted" {
            let _ = helper.kill();
            let out = helper.wait_with_output().unwrap();
            panic!(
                "could not mount a {mib} MiB tmpfs in a mount namespace of its own (root is \
                 needed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self { helper }
    }

    /// `path` (absolute) as seen inside the namespace.
    pub fn path(&self, path: &std::path::Path) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("/proc/{}/root{}", self.helper.id(), path.display()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = self.helper.kill();
        let _ = self.helper.wait();
    }
}
