//! Test VMMs (`wset-guest` processes) and the typed builder that starts
//! them: `Guest::builder(vm_id, script)`, then what the test varies (kind,
//! backing, handshake, memory, fill, snapshot, cgroup), then `start`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

pub use wset_guest::memory::BackingArg as Backing;
pub use wset_guest::script::Script;
pub use wset_guest::vmm::HandshakeArg as Handshake;

use super::{Agent, bin, command, require, wait_for};

/// Where a test guest's accesses run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GuestKind {
    /// A real KVM guest (needs /dev/kvm).
    #[default]
    Kvm,
    /// The same script run from a thread of the VMM process.
    Process,
}

impl GuestKind {
    fn arg(self) -> &'static str {
        match self {
            GuestKind::Kvm => "kvm",
            GuestKind::Process => "process",
        }
    }
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.arg())
    }
}

/// One test VMM to start: a KVM guest on 32 MiB of memfd memory speaking
/// wset.v1 unless told otherwise.
#[derive(Clone, Debug)]
#[must_use = "a guest builder does nothing until started"]
pub struct GuestBuilder {
    vm_id: String,
    script: Script,
    kind: GuestKind,
    backing: Backing,
    handshake: Handshake,
    memory_mib: u64,
    fill_seed: Option<u32>,
    snapshot: Option<PathBuf>,
    drop_uffd: bool,
    cgroup: Option<PathBuf>,
}

impl GuestBuilder {
    pub fn kind(mut self, kind: GuestKind) -> Self {
        self.kind = kind;
        self
    }

    pub fn backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    pub fn handshake(mut self, handshake: Handshake) -> Self {
        self.handshake = handshake;
        self
    }

    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Fill data pages with the pattern for `seed` before registering, and
    /// verify checksums against it.
    pub fn fill_seed(mut self, seed: u32) -> Self {
        self.fill_seed = Some(seed);
        self
    }

    /// Firecracker snapshot restore: guest memory is written to this file,
    /// which the agent serves faults from.
    pub fn snapshot(mut self, file: impl Into<PathBuf>) -> Self {
        self.snapshot = Some(file.into());
        self
    }

    /// The VMM closes its own copy of the uffd once the agent has it.
    pub fn drop_uffd(mut self) -> Self {
        self.drop_uffd = true;
        self
    }

    /// Run the VMM in this cgroup directory (it moves itself there before
    /// it starts).
    pub fn cgroup(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cgroup = Some(dir.into());
        self
    }

    /// Start the VMM and wait until it has registered with `agent`.
    /// Firecracker's handshake has no reply, so for it the wait is also for
    /// the agent to list the VM.
    pub fn start(self, agent: &Agent) -> Guest {
        let no_reply = self.handshake == Handshake::Firecracker;
        let g = self.start_at(&agent.socket);
        if no_reply {
            wait_for(
                Duration::from_secs(30),
                &format!(
                    "the agent to list {} after its Firecracker handshake",
                    g.vm_id
                ),
                || {
                    agent
                        .list()
                        .iter()
                        .any(|v| v.vm_id == g.vm_id)
                        .then_some(())
                },
            );
        }
        g
    }

    /// Start the VMM against the agent socket `socket` (unused with
    /// `Handshake::None`) and wait for its `registered` event.
    pub fn start_at(self, socket: &Path) -> Guest {
        let firecracker = self.handshake == Handshake::Firecracker;
        let mut g = self.spawn_at(socket);
        let reg = g.wait_event("registered", Duration::from_secs(30));
        if firecracker {
            g.vm_id = format!("fc-{}", reg["pid"]);
        }
        g.registered = reg;
        g
    }

    /// Start a guest that `agent` must refuse; returns the refusal.
    pub fn refused(self, agent: &Agent) -> String {
        let vm_id = self.vm_id.clone();
        let g = self.spawn_at(&agent.socket);
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match g.events.recv_timeout(left) {
                Ok(v) if v["event"] == "error" => {
                    return v["message"].as_str().unwrap_or_default().to_owned();
                }
                Ok(v) if v["event"] == "registered" => {
                    panic!("guest {vm_id} was registered, not refused: {v}")
                }
                Ok(_) => continue,
                Err(e) => panic!("guest {vm_id}: no refusal within 30 s ({e})"),
            }
        }
    }

    /// Run the VMM against `socket`, without waiting for anything.
    fn spawn_at(self, socket: &Path) -> Guest {
        if self.kind == GuestKind::Kvm {
            require("/dev/kvm", "KVM guests need /dev/kvm");
        }
        let mut cmd = match &self.cgroup {
            None => command(bin("wset-guest")),
            Some(dir) => {
                let mut c = command("sh".into());
                c.arg("-c")
                    .arg(r#"echo $$ > "$0/cgroup.procs" && exec "$@""#)
                    .arg(dir)
                    .arg(bin("wset-guest"));
                c
            }
        };
        cmd.arg("--socket")
            .arg(socket)
            .args(["--kind", self.kind.arg()])
            .args(["--backing", &self.backing.to_string()])
            .args(["--handshake", &self.handshake.to_string()])
            .args(["--mem-mib", &self.memory_mib.to_string()])
            .args(["--vm-id", &self.vm_id])
            .arg("--script")
            .arg(serde_json::to_string(&self.script).expect("script json"))
            .arg("--wait-stdin");
        if let Some(s) = self.fill_seed {
            cmd.args(["--fill-seed", &s.to_string()]);
        }
        if let Some(p) = &self.snapshot {
            cmd.arg("--snapshot").arg(p);
        }
        if self.drop_uffd {
            cmd.arg("--drop-uffd");
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn wset-guest");
        super::shared::note(&child);
        let stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Guest {
            child,
            stdin,
            events: rx,
            vm_id: self.vm_id,
            registered: serde_json::Value::Null,
        }
    }
}

/// A running test VMM.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<serde_json::Value>,
    pub vm_id: String,
    pub registered: serde_json::Value,
}

impl Guest {
    /// A guest `vm_id` that runs `script`; the builder's defaults are a KVM
    /// guest, 32 MiB of memfd memory, the wset.v1 handshake, no fill.
    pub fn builder(vm_id: &str, script: Script) -> GuestBuilder {
        GuestBuilder {
            vm_id: vm_id.into(),
            script,
            kind: GuestKind::Kvm,
            backing: Backing::Memfd,
            handshake: Handshake::Wset,
            memory_mib: 32,
            fill_seed: None,
            snapshot: None,
            drop_uffd: false,
            cgroup: None,
        }
    }

    /// Wait for the next event named `name`; fails on an `error` event.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> serde_json::Value {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == name => return v,
                Ok(v) if v["event"] == "error" => {
                    panic!("guest {} failed: {}", self.vm_id, v["message"])
                }
                Ok(_) => continue,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("guest {}: no {name:?} event within {timeout:?}", self.vm_id)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("guest {} exited before {name:?}", self.vm_id)
                }
            }
        }
    }

    /// Ask the finished guest for a fresh full checksum.
    pub fn verify_now(&mut self) -> serde_json::Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"verify\n").expect("write to guest");
        stdin.flush().expect("flush");
        self.wait_event("verify", Duration::from_secs(60))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Close stdin and wait for a clean exit.
    pub fn finish(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait guest") {
                return st;
            }
            assert!(Instant::now() < end, "guest {} did not exit", self.vm_id);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill();
        }
    }
}
