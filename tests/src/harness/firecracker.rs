//! A real Firecracker (v1.16.1) for the end-to-end tests and benchmarks.
//! `scripts/firecracker.sh` finds the VMM, Firecracker's own example
//! page-fault handlers and the `memloop` guest kernel, whose workload lives
//! in the kernel (this machine's KVM runs guest kernels only): it fills its
//! loop memory, then each tick reads nine words of every page, checks them,
//! rewrites a quarter of the pages and prints `MEMLOOP tick=N OK|BAD
//! bad=<total> verify_ms=<ms>`. Here a VM is booted, paused and snapshotted,
//! or restored from a snapshot through a page-fault handler's socket, with
//! its console followed line by line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::shared::{command, note};
use super::{TempDir, wait_for};

/// Where the Firecracker binaries and the guest kernel are.
#[derive(Debug)]
pub struct Bundle {
    pub firecracker: PathBuf,
    pub on_demand_handler: PathBuf,
    pub fault_all_handler: PathBuf,
    pub kernel: PathBuf,
    /// Where the VMM came from (the official release, or the bundle's build).
    pub origin: String,
}

/// The bundle, found once by `scripts/firecracker.sh`; a test fails with
/// the script's reason when there is none.
pub fn bundle() -> &'static Bundle {
    static B: OnceLock<Bundle> = OnceLock::new();
    B.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/firecracker.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "no Firecracker to test against ({}):\n{stderr}",
            script.display()
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |k: &str| -> String {
            text.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("{} printed no {k}=:\n{text}", script.display()))
                .to_owned()
        };
        Bundle {
            firecracker: get("FIRECRACKER").into(),
            on_demand_handler: get("ON_DEMAND_HANDLER").into(),
            fault_all_handler: get("FAULT_ALL_HANDLER").into(),
            kernel: get("KERNEL").into(),
            origin: get("ORIGIN"),
        }
    })
}

/// The boot arguments that keep the guest kernel off the instructions this
/// machine's KVM cannot run (the bundle's README).
/// A boot whose console shows nothing new for this long has stopped (beside
/// two CPU hogs a whole boot took 48 s here, its longest quiet stretch 12 s;
/// each successful boot prints its own).
const BOOT_STALL: Duration = Duration::from_secs(60);
/// Boots tried before a test fails. Beside two CPU hogs and with two guests
/// booting at once, 3 of 6 boots stalled here (always after "futex hash
/// table entries", before the switch to kvm-clock: the guest's one-shot
/// TSC-deadline timer event is lost and its clock never ticks again). With
/// `lapic=notscdeadline` none of 4 stalled, but the LAPIC timer then fails
/// its calibration under load and the PIT takes over, doubling the boot; so
/// the boot is tried again instead.
const BOOT_ATTEMPTS: u32 = 6;

const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 noxsave \
    clearcpuid=cx16,popcnt,xsave,avx,avx2,bmi1,bmi2,erms,fsrm,smap,smep,pcid,invpcid,rdpid,\
    rdseed,rdrand,fsgsbase,clflushopt,clwb,movbe clocksource=kvm-clock tsc=unstable \
    no_timer_check nopti mitigations=off";

/// One `MEMLOOP tick=` line of the guest's console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tick {
    pub n: u64,
    pub ok: bool,
    /// Mismatched words seen since the loop started.
    pub bad_total: u64,
    /// How long the tick's check of every page took, guest time.
    pub verify_ms: u64,
}

impl Tick {
    fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find("MEMLOOP tick=")? + "MEMLOOP tick=".len()..];
        let mut it = rest.split_whitespace();
        let n = it.next()?.parse().ok()?;
        let ok = match it.next()? {
            "OK" => true,
            "BAD" => false,
            _ => return None,
        };
        let bad_total = it.next()?.strip_prefix("bad=")?.parse().ok()?;
        let verify_ms = it.next()?.strip_prefix("verify_ms=")?.parse().ok()?;
        Some(Self {
            n,
            ok,
            bad_total,
            verify_ms,
        })
    }
}

/// A full snapshot: the VM's state and its guest memory file.
#[derive(Debug)]
pub struct Snapshot {
    pub vmstate: PathBuf,
    pub mem: PathBuf,
    pub mem_bytes: u64,
    /// Pages of the guest's loop (each read every tick, a quarter written).
    pub loop_pages: u64,
    _dir: TempDir,
}

/// One Firecracker process.
pub struct Firecracker {
    child: Child,
    api: PathBuf,
    console: Arc<Mutex<Vec<String>>>,
    ticks: Receiver<(Tick, Instant)>,
    /// When the VM was asked to start or to load its snapshot.
    pub started: Instant,
    pub dir: TempDir,
}

impl std::fmt::Debug for Firecracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Firecracker")
            .field("pid", &self.child.id())
            .field("api", &self.api)
            .finish()
    }
}

impl Firecracker {
    /// Start the VMM with its API socket and console in a directory of its own.
    fn spawn(tag: &str) -> Self {
        super::require("/dev/kvm", "Firecracker runs its guest under KVM");
        let b = bundle();
        let dir = TempDir::new(tag);
        let api = dir.0.join("api.sock");
        let mut child = command(b.firecracker.clone())
            .arg("--api-sock")
            .arg(&api)
            .args(["--level", "Info", "--log-path"])
            .arg(dir.0.join("firecracker.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", b.firecracker.display()));
        note(&child);
        let console = Arc::new(Mutex::new(Vec::new()));
        let (tx, ticks) = channel();
        let stdout = child.stdout.take().expect("stdout");
        let c2 = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if std::env::var_os("WSET_TEST_VERBOSE").is_some() {
                    eprintln!("firecracker| {line}");
                }
                if let Some(t) = Tick::parse(&line) {
                    let _ = tx.send((t, Instant::now()));
                }
                c2.lock().unwrap().push(line);
            }
        });
        wait_for(Duration::from_secs(10), "Firecracker's API socket", || {
            UnixStream::connect(&api).ok().map(|_| ())
        });
        Self {
            child,
            api,
            console,
            ticks,
            started: Instant::now(),
            dir,
        }
    }

    /// One call to the API; the response body, or the status line and body.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.api).map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("send: {e}"))?;
        // Headers, then Content-Length bytes of body.
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).map_err(|e| format!("read: {e}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).map_err(|e| format!("read: {e}"))?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v
                    .trim()
                    .parse()
                    .map_err(|e| format!("content-length: {e}"))?;
            }
        }
        let mut out = vec![0u8; len];
        r.read_exact(&mut out)
            .map_err(|e| format!("read body: {e}"))?;
        let out = String::from_utf8_lossy(&out).into_owned();
        match status.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(out),
            _ => Err(format!("{method} {path}: {} {out}", status.trim_end())),
        }
    }

    fn call(&self, method: &str, path: &str, body: &str) -> String {
        self.api(method, path, Some(body))
            .unwrap_or_else(|e| panic!("Firecracker API: {e}; console:\n{}", self.console_tail()))
    }

    /// Boot the memloop guest with `mem_mib` of memory and a loop over
    /// `loop_mib` of it, one vCPU.
    pub fn boot(tag: &str, mem_mib: u64, loop_mib: u64) -> Self {
        Self::boot_with(tag, mem_mib, loop_mib, false)
    }

    /// The same, its memory backed by 2 MiB hugetlbfs pages
    /// (`huge_pages: "2M"`); the caller reserves them.
    pub fn boot_huge(tag: &str, mem_mib: u64, loop_mib: u64) -> Self {
        Self::boot_with(tag, mem_mib, loop_mib, true)
    }

    fn boot_with(tag: &str, mem_mib: u64, loop_mib: u64, huge: bool) -> Self {
        for attempt in 1..=BOOT_ATTEMPTS {
            let mut fc = Self::spawn(tag);
            let b = bundle();
            let boot = serde_json::json!({
                "kernel_image_path": b.kernel,
                "boot_args": format!("{BOOT_ARGS} memloop.mb={loop_mib}"),
            });
            fc.call("PUT", "/boot-source", &boot.to_string());
            let huge = if huge { r#","huge_pages":"2M""# } else { "" };
            fc.call(
                "PUT",
                "/machine-config",
                &format!(r#"{{"vcpu_count":1,"mem_size_mib":{mem_mib}{huge}}}"#),
            );
            fc.started = Instant::now();
            fc.call("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
            match fc.booted() {
                Ok(()) => return fc,
                Err(last) => {
                    // The emulated guest kernel (not wset: nothing of wset
                    // is involved in a boot) sometimes stops for good under
                    // host load, each time seen after "futex hash table
                    // entries", before its switch to kvm-clock: boot again.
                    eprintln!(
                        "Firecracker {}: the guest's boot stopped after {last:?} (no console \
                         output for {BOOT_STALL:?}); booting again ({attempt} of {BOOT_ATTEMPTS})",
                        fc.child.id()
                    );
                    fc.kill();
                }
            }
        }
        panic!("the Firecracker guest's boot stalled {BOOT_ATTEMPTS} times in a row")
    }

    /// Wait for the first tick of a boot, while the console moves; the
    /// last line when it stops moving for [`BOOT_STALL`].
    fn booted(&self) -> Result<(), String> {
        let (mut seen, mut moved, mut quiet) = (0, Instant::now(), Duration::ZERO);
        loop {
            match self.ticks.recv_timeout(Duration::from_secs(1)) {
                Ok(_) => {
                    eprintln!(
                        "Firecracker {}: booted in {:.0?}, the console quiet for {:.0?} at most",
                        self.child.id(),
                        self.started.elapsed(),
                        quiet.max(moved.elapsed())
                    );
                    return Ok(());
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "Firecracker {} exited while booting; console:\n{}",
                    self.child.id(),
                    self.console_tail()
                ),
                Err(RecvTimeoutError::Timeout) => {}
            }
            let c = self.console.lock().unwrap();
            if c.len() != seen {
                quiet = quiet.max(moved.elapsed());
                (seen, moved) = (c.len(), Instant::now());
            } else if moved.elapsed() > BOOT_STALL {
                return Err(c.last().cloned().unwrap_or_default());
            }
        }
    }

    /// Pause right after a tick, write a full snapshot and stop the VMM.
    pub fn snapshot(mut self, loop_mib: u64) -> Snapshot {
        let dir = TempDir::new("fc-snapshot");
        // Right after a tick the loop sleeps: the snapshot is between passes.
        self.wait_tick(Duration::from_secs(600));
        self.call("PATCH", "/vm", r#"{"state":"Paused"}"#);
        let (vmstate, mem) = (dir.0.join("vmstate"), dir.0.join("mem"));
        let req = serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": vmstate,
            "mem_file_path": mem,
        });
        self.call("PUT", "/snapshot/create", &req.to_string());
        self.kill();
        let mem_bytes = std::fs::metadata(&mem).expect("snapshot memory file").len();
        Snapshot {
            vmstate,
            mem,
            mem_bytes,
            loop_pages: loop_mib * 256,
            _dir: dir,
        }
    }

    /// A fresh VMM loading `snap` with its memory served by the page-fault
    /// handler listening on `handler`, resumed at once.
    pub fn restore(tag: &str, snap: &Snapshot, handler: &Path) -> Self {
        let mut fc = Self::spawn(tag);
        let req = serde_json::json!({
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": "Uffd", "backend_path": handler},
            "resume_vm": true,
        });
        fc.started = Instant::now();
        fc.call("PUT", "/snapshot/load", &req.to_string());
        fc
    }

    /// The next tick the guest prints, with when it arrived.
    pub fn next_tick(&self, timeout: Duration) -> (Tick, Instant) {
        match self.ticks.recv_timeout(timeout) {
            Ok(t) => t,
            Err(RecvTimeoutError::Timeout) => panic!(
                "Firecracker {}: no MEMLOOP tick within {timeout:?}; console:\n{}",
                self.child.id(),
                self.console_tail()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "Firecracker {} exited; console:\n{}",
                self.child.id(),
                self.console_tail()
            ),
        }
    }

    /// The next tick; it must be OK.
    pub fn wait_tick(&self, timeout: Duration) -> Tick {
        let (t, _) = self.next_tick(timeout);
        assert!(
            t.ok,
            "the guest's check failed: {t:?}\n{}",
            self.console_tail()
        );
        t
    }

    /// Whether a tick arrives within `timeout` (for a guest expected to wait).
    pub fn tick_within(&self, timeout: Duration) -> Option<Tick> {
        self.ticks.recv_timeout(timeout).ok().map(|(t, _)| t)
    }

    pub fn console_tail(&self) -> String {
        let c = self.console.lock().unwrap();
        c[c.len().saturating_sub(30)..].join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the VMM still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Where the guest memory is in the VMM: its one mapping of
    /// `mem_bytes` (ask while a handler has it registered, before a merge
    /// with a neighbour can hide its bounds).
    pub fn guest_memory(&self, mem_bytes: u64) -> std::ops::Range<u64> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.child.id()))
            .expect("read the VMM's maps");
        maps.lines()
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some(u64::from_str_radix(a, 16).ok()?..u64::from_str_radix(b, 16).ok()?)
            })
            .find(|r| r.end - r.start == mem_bytes)
            .unwrap_or_else(|| panic!("no mapping of {mem_bytes} bytes in the VMM:\n{maps}"))
    }

    /// Bytes of `range` present in the VMM (its pagemap: resident or swapped).
    pub fn present_bytes(&self, range: &std::ops::Range<u64>) -> u64 {
        use std::os::unix::fs::FileExt as _;
        let pm = std::fs::File::open(format!("/proc/{}/pagemap", self.child.id()))
            .expect("open the VMM's pagemap");
        let pages = (range.end - range.start) / 4096;
        let mut buf = vec![0u8; pages as usize * 8];
        pm.read_exact_at(&mut buf, range.start / 4096 * 8)
            .expect("read the VMM's pagemap");
        let present = buf
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 62 != 0)
            .count() as u64;
        present * 4096
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Firecracker's own example page-fault handler serving a snapshot.
#[derive(Debug)]
pub struct Handler {
    child: Child,
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Handler {
    /// `uffd_on_demand_handler` (`all: false`) or `uffd_fault_all_handler`.
    pub fn start(all: bool, snap: &Snapshot) -> Self {
        let b = bundle();
        let dir = TempDir::new("fc-handler");
        let socket = dir.0.join("handler.sock");
        let prog = if all {
            &b.fault_all_handler
        } else {
            &b.on_demand_handler
        };
        let child = command(prog.clone())
            .arg(&socket)
            .arg(&snap.mem)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", prog.display()));
        note(&child);
        wait_for(Duration::from_secs(10), "the handler's socket", || {
            socket.exists().then_some(())
        });
        Self {
            child,
            socket,
            _dir: dir,
        }
    }
}

impl Handler {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::Tick;

    #[test]
    fn ticks_parse_from_the_console() {
        assert_eq!(
            Tick::parse("[   12.345678] MEMLOOP tick=7 OK bad=0 verify_ms=6512"),
            Some(Tick {
                n: 7,
                ok: true,
                bad_total: 0,
                verify_ms: 6512
            })
        );
        assert_eq!(
            Tick::parse("MEMLOOP tick=8 BAD bad=9 verify_ms=1").map(|t| t.ok),
            Some(false)
        );
        assert_eq!(Tick::parse("MEMLOOP filled 64 MiB"), None);
    }
}
