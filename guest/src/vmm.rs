//! The VMM side of the handshakes: create a uffd the way Firecracker or a
//! wset.v1 VMM does, and hand it to the agent.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::json;
use wset_tracker::Uffd;
use wset_tracker::uffd::{feature, mode};

use crate::memory::{BackingArg, GuestMemory};

/// Which handshake the test VMM speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandshakeArg {
    Firecracker,
    Wset,
    /// No agent: run untracked (the baseline for slowdown figures).
    None,
}

/// The command-line spelling (`wset`, ...).
impl std::fmt::Display for HandshakeArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HandshakeArg::Firecracker => "firecracker",
            HandshakeArg::Wset => "wset",
            HandshakeArg::None => "none",
        })
    }
}

/// Create a uffd as Firecracker does: only `EVENT_REMOVE` requested, every
/// region registered `MODE_MISSING` by the VMM itself.
pub fn firecracker_uffd(mem: &GuestMemory) -> std::io::Result<Uffd> {
    let u = Uffd::create(feature::EVENT_REMOVE)?;
    u.register(mem.addr(), mem.len() as u64, mode::MISSING)?;
    Ok(u)
}

/// Send Firecracker's exact handshake. The stream stays open for the VM's
/// life, as Firecracker keeps it.
pub fn firecracker_handshake(
    socket: &Path,
    mem: &GuestMemory,
    uffd: &Uffd,
) -> std::io::Result<UnixStream> {
    let s = UnixStream::connect(socket)?;
    let msg = json!([{
        "base_host_virt_addr": mem.addr(),
        "size": mem.len(),
        "offset": 0,
        "page_size": 4096,
        "page_size_kib": 4096
    }]);
    wset_tracker::fdpass::send_with_fds(
        s.as_raw_fd(),
        msg.to_string().as_bytes(),
        &[uffd.as_raw_fd()],
    )?;
    Ok(s)
}

/// Ask the agent which features to request for `backing`.
pub fn wset_features(socket: &Path, backing: BackingArg) -> std::io::Result<u64> {
    let b = backing_name(backing);
    let reply = wset_exchange(
        socket,
        &json!({"version": "wset.v1", "op": "features", "backing": b}),
        &[],
    )?;
    reply["recommended_features"]
        .as_u64()
        .ok_or_else(|| std::io::Error::other(format!("no recommended_features in {reply}")))
}

fn backing_name(b: BackingArg) -> &'static str {
    match b {
        BackingArg::Anon | BackingArg::Thp => "anonymous",
        BackingArg::Memfd => "memfd",
        BackingArg::Hugetlb => "hugetlbfs",
    }
}

/// Create a uffd with the features the agent recommends.
pub fn wset_uffd(socket: &Path, backing: BackingArg) -> std::io::Result<Uffd> {
    let want = wset_features(socket, backing)?;
    Uffd::create(want)
}

/// Register with the wset.v1 handshake; returns the agent's JSON reply.
pub fn wset_register(
    socket: &Path,
    vm_id: &str,
    labels: serde_json::Value,
    mem: &GuestMemory,
    backing: BackingArg,
    uffd: &Uffd,
) -> std::io::Result<serde_json::Value> {
    let hello = json!({
        "version": "wset.v1",
        "vm_id": vm_id,
        "name": vm_id,
        "labels": labels,
        "backing": backing_name(backing),
        "page_size": backing.page_size(),
        "regions": [{"host_addr": mem.addr(), "size": mem.len(), "file_offset": 0}],
    });
    let mut fds = vec![uffd.as_raw_fd()];
    if let Some(m) = mem.memfd() {
        fds.push(m.as_raw_fd());
    }
    wset_exchange(socket, &hello, &fds)
}

/// Send one wset.v1 message with `fds` and read the one-line reply.
pub fn wset_exchange(
    socket: &Path,
    msg: &serde_json::Value,
    fds: &[RawFd],
) -> std::io::Result<serde_json::Value> {
    let s = UnixStream::connect(socket)?;
    let mut line = msg.to_string();
    line.push('\n');
    wset_tracker::fdpass::send_with_fds(s.as_raw_fd(), line.as_bytes(), fds)?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply)?;
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::other(format!("bad reply {reply:?}: {e}")))
}
