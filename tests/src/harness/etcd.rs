//! A real etcd cluster on loopback (Debian's `etcd-server`), started by the
//! test: three members by default, each with its own client and peer port
//! and data directory. A member can be paused (SIGSTOP: it answers no one,
//! as if cut off by the network) and resumed.

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use super::{TempDir, free_loopback_addr, http_get, shared};

/// One etcd member.
#[derive(Debug)]
struct Member {
    child: Child,
    client: String,
    paused: bool,
}

/// A running etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    members: Vec<Member>,
    _dir: TempDir,
}

/// Where Debian's `etcd-server` puts etcd.
fn etcd_binary() -> PathBuf {
    let p = PathBuf::from("/usr/bin/etcd");
    assert!(
        p.exists(),
        "{} not found: the replica tests need a real etcd (apt-get install etcd-server; scripts/test.sh installs it)",
        p.display()
    );
    p
}

impl Etcd {
    /// Start `n` members as one new cluster and wait until every member
    /// reports itself healthy (a leader elected, a proposal committed).
    pub fn start(n: usize) -> Self {
        let bin = etcd_binary();
        let dir = TempDir::new("etcd");
        let addrs: Vec<(String, String)> = (0..n)
            .map(|_| (free_loopback_addr(), free_loopback_addr()))
            .collect();
        let cluster = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("wset-test-{}", dir.0.display());
        let members = addrs
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let mut cmd = shared::command(bin.clone());
                let log = std::fs::File::create(dir.0.join(format!("m{i}.log"))).expect("etcd log");
                cmd.args([
                    "--name",
                    &format!("m{i}"),
                    "--data-dir",
                    &dir.0.join(format!("m{i}")).display().to_string(),
                    "--listen-client-urls",
                    &format!("http://{client}"),
                    "--advertise-client-urls",
                    &format!("http://{client}"),
                    "--listen-peer-urls",
                    &format!("http://{peer}"),
                    "--initial-advertise-peer-urls",
                    &format!("http://{peer}"),
                    "--initial-cluster",
                    &cluster,
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    &token,
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("etcd log"))
                .stderr(log);
                let child = cmd.spawn().expect("start etcd");
                shared::note(&child);
                Member {
                    child,
                    client: client.clone(),
                    paused: false,
                }
            })
            .collect();
        let etcd = Self { members, _dir: dir };
        let end = std::time::Instant::now() + Duration::from_secs(60);
        for (i, m) in etcd.members.iter().enumerate() {
            loop {
                let healthy = std::net::TcpStream::connect(&m.client).is_ok() && {
                    let (code, body) = http_get(&m.client, "/health");
                    code == 200 && body.contains("true")
                };
                if healthy {
                    break;
                }
                if std::time::Instant::now() > end {
                    let log = std::fs::read_to_string(etcd._dir.0.join(format!("m{i}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    panic!(
                        "etcd member m{i} ({}) not healthy within 60 s; its log ends:\n{}",
                        m.client,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        etcd
    }

    /// Member `i`'s client address (HOST:PORT).
    pub fn endpoint(&self, i: usize) -> &str {
        &self.members[i].client
    }

    /// Every member's client address, comma-separated.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.client.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn signal(&mut self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.members[i].child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signal an etcd member");
    }

    /// Stop member `i` answering anyone (SIGSTOP).
    pub fn pause(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
        self.members[i].paused = true;
    }

    /// Let member `i` go on (SIGCONT).
    pub fn resume(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
        self.members[i].paused = false;
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].paused {
                self.resume(i);
            }
            let _ = self.members[i].child.kill();
            let _ = self.members[i].child.wait();
        }
    }
}
