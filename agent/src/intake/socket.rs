//! The socket side: binding a VMM socket, reading one complete handshake
//! with the fds passed beside it, and answering a wset.v1 peer.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use super::{IntakeError, MAX_FDS};
use crate::config::SocketConfig;
use crate::handshake::{self, WsetReply};

/// Bind one socket: create its directory, replace a stale socket file, and
/// set its mode and group.
pub fn bind(sock: &SocketConfig, mode: u32, group: Option<u32>) -> io::Result<UnixListener> {
    let path = &sock.path;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
    }
    if path.exists() {
        // A live agent answers on it; a stale file from a dead one does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another running agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| io::Error::new(e.kind(), format!("bind {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
            io::Error::other(format!("chown {} to group {gid}: {e}", path.display()))
        })?;
    }
    Ok(l)
}

pub(super) async fn reply_if_wset(
    stream: &mut UnixStream,
    bytes: Option<&[u8]>,
    reply: &WsetReply,
) {
    let is_wset = bytes.is_some_and(|b| b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'{'));
    if is_wset {
        let mut line = serde_json::to_vec(reply).expect("reply serializes");
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
    }
}

/// Read until one complete JSON value has arrived, collecting passed fds.
pub(super) async fn read_handshake(
    stream: &UnixStream,
) -> Result<(Vec<u8>, Vec<OwnedFd>), IntakeError> {
    let mut buf = Vec::with_capacity(4096);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        stream.readable().await?;
        let r = stream.try_io(Interest::READABLE, || {
            recv_chunk(stream.as_raw_fd(), &mut chunk)
        });
        let (n, got) = match r {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        fds.extend(got);
        if fds.len() > MAX_FDS {
            return Err(IntakeError::FdCount {
                want: MAX_FDS,
                got: fds.len(),
                what: "too many",
            });
        }
        if n == 0 {
            // EOF: whatever arrived is the whole message.
            if buf.is_empty() {
                return Err(handshake::HandshakeError::Empty.into());
            }
            if !handshake::is_complete(&buf) {
                // Let the parser name the problem (truncated or garbage).
                return Ok((buf, fds));
            }
            return Ok((buf, fds));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > handshake::MAX_MESSAGE_BYTES {
            return Err(handshake::HandshakeError::TooLarge.into());
        }
        if handshake::is_complete(&buf) {
            return Ok((buf, fds));
        }
    }
}

fn recv_chunk(fd: RawFd, chunk: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    wset_tracker::fdpass::recv_with_fds(fd, chunk)
}
