//! Bad input never hurts anyone else: every malformed or hostile handshake
//! gets an error that names the problem (a reply for wset.v1 peers, a log
//! line always), bogus gRPC arguments get the right status, a VMM that dies
//! is retired, and a well-behaved KVM guest on the same agent keeps being
//! served through all of it.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use wset_guest::memory::{BackingArg, GuestMemory};
use wset_guest::script::{Op, Phase, Script, Touch};
use wset_proto::v1 as pb;
use wset_tests::harness::{Agent, AgentOpts, Guest, GuestKind, Shared, bin};
use wset_tracker::Uffd;

/// A well-behaved KVM guest reading 100 pages every 100 ms for
/// `duration_ms`, checksumming its memory every tenth period.
fn good_guest(agent: &Agent, duration_ms: u64) -> Guest {
    let p = Phase {
        name: "steady".into(),
        touches: vec![Touch {
            op: Op::Read,
            start: 16,
            pages: 100,
        }],
        duration_ms,
        period_ms: 100,
    };
    Guest::builder(
        "good",
        Script {
            phases: vec![p],
            checksum_every: 10,
        },
    )
    .memory_mib(16)
    .fill_seed(3)
    .start(agent)
}

/// One agent and its good guest (VM "good", for the binary's life), shared
/// by the tests that need a well-behaved VM beside the misbehaving ones
/// they bring themselves.
struct Served {
    agent: Agent,
    good: Mutex<Guest>,
}

static SERVED: Shared<Served> = Shared::new(|| {
    let agent = Agent::start(AgentOpts {
        access: "exhaustive".into(),
        ..Default::default()
    });
    let good = Mutex::new(good_guest(&agent, 3_600_000));
    Served { agent, good }
});

/// The good VM (its id) is still tracked and its tracker still advancing.
fn assert_unaffected(agent: &Agent, good: &str, after: &str) {
    let e = agent
        .summary(good)
        .unwrap_or_else(|s| panic!("after {after}: good VM gone: {s}"))
        .epoch;
    let s = agent.wait_summary(
        good,
        Duration::from_secs(10),
        &format!("epoch advancing after {after}"),
        |s| s.epoch >= e + 2,
    );
    assert_eq!(s.state, pb::VmState::Tracking as i32, "after {after}");
    assert!(
        s.windows[0].wss_bytes > 0,
        "after {after}: good VM shows no working set"
    );
}

/// Send raw bytes with fds; return the reply line, if any.
fn raw(agent: &Agent, bytes: &[u8], fds: &[i32], half_close: bool) -> Option<serde_json::Value> {
    let s = UnixStream::connect(&agent.socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    wset_tracker::fdpass::send_with_fds(s.as_raw_fd(), bytes, fds).expect("send");
    if half_close {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(serde_json::from_str(&line).expect("reply is JSON")),
        _ => None,
    }
}

fn hello(mem: &GuestMemory, regions: serde_json::Value) -> Vec<u8> {
    let _ = mem;
    let mut v =
        json!({"version": "wset.v1", "vm_id": "bad", "backing": "anonymous", "regions": regions})
            .to_string()
            .into_bytes();
    v.push(b'\n');
    v
}

fn expect_refusal(
    agent: &Agent,
    good: &str,
    case: &str,
    reply: Option<serde_json::Value>,
    want: &str,
) {
    let r = reply.unwrap_or_else(|| panic!("{case}: no reply"));
    assert_eq!(r["ok"], false, "{case}: {r}");
    let msg = r["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains(want),
        "{case}: error {msg:?} does not say {want:?}"
    );
    agent.wait_log(want, Duration::from_secs(5));
    assert_unaffected(agent, good, case);
}

#[test]
fn bad_handshakes_are_refused_and_others_keep_being_served() {
    let served = SERVED.get();
    let agent = &served.agent;
    let good = "good";
    let mem = GuestMemory::new(BackingArg::Anon, 1 << 20).unwrap();
    let (a, len) = (mem.addr(), mem.len() as u64);
    let status = std::fs::File::open("/proc/self/status").unwrap();

    // Not a uffd.
    let r = raw(
        agent,
        &hello(&mem, json!([{"host_addr": a, "size": len}])),
        &[status.as_raw_fd()],
        false,
    );
    expect_refusal(agent, good, "not a uffd", r, "is not a userfaultfd");

    // 2 MiB whose upper half is PROT_NONE, and a shared memfd mapping that an
    // "anonymous" registration must not cover.
    let guarded = GuestMemory::new(BackingArg::Anon, 2 << 20).unwrap();
    let upper = (guarded.addr() + (1 << 20)) as *mut libc::c_void;
    // SAFETY: changing the protection of the upper half of our own mapping.
    let rc = unsafe { libc::mprotect(upper, 1 << 20, libc::PROT_NONE) };
    assert_eq!(rc, 0);
    let file_map = GuestMemory::new(BackingArg::Memfd, 1 << 20).unwrap();
    let uffd = Uffd::create(0).unwrap();
    let u = uffd.as_raw_fd();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "overlapping regions",
            json!([{"host_addr": a, "size": 0x2000}, {"host_addr": a + 0x1000, "size": 0x2000}]),
            "overlap",
        ),
        (
            "unaligned region",
            json!([{"host_addr": a + 1, "size": 0x1000}]),
            "not aligned",
        ),
        (
            "unmapped region",
            json!([{"host_addr": 0x1000, "size": 0x1000}]),
            "is not mapped in the VMM process",
        ),
        (
            "partly PROT_NONE region",
            json!([{"host_addr": guarded.addr(), "size": guarded.len()}]),
            "not readable and writable",
        ),
        (
            "anonymous region over a file",
            json!([{"host_addr": file_map.addr(), "size": file_map.len()}]),
            "not anonymous memory",
        ),
        (
            "absurd size",
            json!([{"host_addr": a, "size": 1u64 << 50}]),
            "exceeds this agent's limit",
        ),
        ("no regions", json!([]), "no regions"),
    ];
    for (case, regions, want) in cases {
        let r = raw(agent, &hello(&mem, regions), &[u], false);
        expect_refusal(agent, good, case, r, want);
    }

    // Garbage that looks like wset.v1 JSON gets a reply; other garbage a log line.
    let r = raw(agent, b"{\"version\": bogus}\n", &[], false);
    expect_refusal(agent, good, "garbage JSON", r, "not valid JSON");
    assert!(raw(agent, b"hello agent\n", &[], true).is_none());
    agent.wait_log(
        "expected a JSON array (Firecracker) or object (wset.v1)",
        Duration::from_secs(5),
    );
    assert_unaffected(agent, good, "garbage bytes");

    // Truncated: the peer closes its side before the JSON is complete.
    let r = raw(
        agent,
        b"{\"version\":\"wset.v1\",\"vm_id\":\"x\"",
        &[],
        true,
    );
    expect_refusal(
        agent,
        good,
        "truncated message",
        r,
        "ended before its JSON was complete",
    );
    assert!(raw(agent, b"[{\"base_host_virt_addr\":", &[u], true).is_none());
    assert_unaffected(agent, good, "truncated Firecracker message");

    // A peer that connects and disconnects without a word.
    drop(UnixStream::connect(&agent.socket).unwrap());
    agent.wait_log("empty handshake", Duration::from_secs(5));
    assert_unaffected(agent, good, "silent disconnect");

    // Wrong version, wrong fd count, duplicate id.
    let r = raw(agent, b"{\"version\":\"wset.v9\"}\n", &[], false);
    expect_refusal(
        agent,
        good,
        "wrong version",
        r,
        "unsupported handshake version",
    );
    let memfd_hello = json!({"version": "wset.v1", "vm_id": "m", "backing": "memfd", "regions": [{"host_addr": a, "size": len}]});
    let r = raw(agent, format!("{memfd_hello}\n").as_bytes(), &[u], false);
    expect_refusal(agent, good, "memfd without its fd", r, "expected 2 fd(s)");
    let dup = json!({"version": "wset.v1", "vm_id": "good", "backing": "anonymous", "regions": [{"host_addr": a, "size": len}]});
    let r = raw(agent, format!("{dup}\n").as_bytes(), &[u], false);
    expect_refusal(agent, good, "duplicate vm_id", r, "already registered");
    let r = raw(agent, b"{\"version\":\"wset.v1\",\"vm_id\":\"../../etc\",\"backing\":\"anonymous\",\"regions\":[]}\n", &[u], false);
    expect_refusal(
        agent,
        good,
        "path-like vm_id",
        r,
        "must be 1 to 64 characters",
    );

    // The good guest's memory is intact after all of that.
    let v = served
        .good
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .verify_now();
    assert_eq!(v["ok"], true, "{v}");
}

#[test]
fn bogus_grpc_arguments_get_clear_statuses() {
    let agent = &SERVED.get().agent;
    let e = agent.summary("").unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("vm_id is required"), "{}", e.message());
    let e = agent.summary("../x").unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    let e = agent.summary("no-such-vm").unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert!(e.message().contains("no-such-vm"), "{}", e.message());
}

#[test]
fn a_vmm_that_dies_is_retired_and_others_continue() {
    let agent = &SERVED.get().agent;
    let good = "good";
    let p = Phase {
        name: "p".into(),
        touches: vec![Touch {
            op: Op::Write,
            start: 16,
            pages: 50,
        }],
        duration_ms: 60_000,
        period_ms: 50,
    };
    let mut doomed = Guest::builder(
        "doomed",
        Script {
            phases: vec![p],
            checksum_every: 0,
        },
    )
    .memory_mib(8)
    .fill_seed(1)
    .start(agent);
    agent.wait_summary("doomed", Duration::from_secs(10), "pages in custody", |s| {
        s.counters.as_ref().is_some_and(|c| c.pages_in_custody > 0)
    });
    doomed.kill();
    let s = agent.wait_summary("doomed", Duration::from_secs(10), "retired", |s| {
        s.state == pb::VmState::Retired as i32
    });
    let vm = agent
        .list()
        .into_iter()
        .find(|v| v.vm_id == "doomed")
        .expect("still listed");
    assert!(
        vm.retired_reason.contains("VMM process exited"),
        "{}",
        vm.retired_reason
    );
    assert_eq!(
        s.counters.unwrap().pages_in_custody,
        0,
        "custody not emptied"
    );
    let custody = agent.dir.0.join("state/custody/doomed.custody");
    assert!(!custody.exists(), "{} left behind", custody.display());
    assert_unaffected(agent, good, "a VMM died");
}

/// Run a test VMM as uid/gid 65534 against the agent; (succeeded, its stdout).
/// The binary is copied to a world-readable place first: the build directory
/// may sit where that uid cannot reach (under /root, say).
fn register_as_nobody(agent: &Agent) -> (bool, String) {
    use std::os::unix::fs::PermissionsExt;
    let dir = wset_tests::harness::TempDir::new("nobody");
    let guest = dir.0.join("wset-guest");
    std::fs::copy(bin("wset-guest"), &guest).unwrap();
    std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&guest)
        .arg("--socket")
        .arg(&agent.socket)
        .args([
            "--kind",
            "process",
            "--backing",
            "anon",
            "--script",
            r#"{"phases":[]}"#,
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn peers_outside_the_uid_allow_list_cannot_register() {
    let agent = Agent::start(AgentOpts::default());
    let good = good_guest(&agent, 120_000);
    // 0660 root:root: another uid cannot even connect.
    let (ok, text) = register_as_nobody(&agent);
    assert!(!ok && text.contains("Permission denied"), "{text}");
    // Opened up by mode, the uid allow-list still refuses, with a log line.
    std::fs::set_permissions(
        &agent.socket,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let (ok, text) = register_as_nobody(&agent);
    assert!(!ok && text.contains("uid 65534"), "{text}");
    agent.wait_log("peer uid 65534", Duration::from_secs(5));
    assert_unaffected(&agent, &good.vm_id, "a refused uid");
}

/// A VMM that unmaps its guest memory while staying alive: the agent hears
/// of it through UFFD_EVENT_UNMAP (not the pidfd) and retires the VM.
#[test]
fn a_vmm_that_unmaps_its_memory_is_retired() {
    let agent = &SERVED.get().agent;
    let good = "good";
    let script = Script {
        phases: vec![
            Phase {
                name: "use".into(),
                touches: vec![Touch {
                    op: Op::Read,
                    start: 16,
                    pages: 50,
                }],
                duration_ms: 600,
                period_ms: 50,
            },
            Phase {
                name: "unmap".into(),
                touches: vec![Touch {
                    op: Op::Unmap,
                    start: 512,
                    pages: 512,
                }],
                duration_ms: 1,
                period_ms: 50,
            },
        ],
        checksum_every: 0,
    };
    let mut g = Guest::builder("unmapper", script)
        .kind(GuestKind::Process)
        .memory_mib(8)
        .start(agent);
    g.wait_event("done", Duration::from_secs(30));
    agent.wait_summary("unmapper", Duration::from_secs(10), "retired", |s| {
        s.state == pb::VmState::Retired as i32
    });
    let vm = agent
        .list()
        .into_iter()
        .find(|v| v.vm_id == "unmapper")
        .expect("still listed");
    assert!(
        vm.retired_reason.contains("unmapped guest memory"),
        "{}",
        vm.retired_reason
    );
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(g.pid() as i32), None).is_ok(),
        "the VMM must still be alive"
    );
    assert_unaffected(agent, good, "a VMM unmapped its memory");
}
