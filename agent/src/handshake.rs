//! The two handshakes a VMM can open with, parsed and validated without IO.
//!
//! * **Firecracker's**, byte for byte: one JSON array of
//!   `{base_host_virt_addr, size, offset, page_size, page_size_kib}` with the
//!   uffd attached. Unknown fields are accepted; nothing is sent back.
//! * **wset.v1**: one JSON object on one line (`{"version":"wset.v1",...}`)
//!   with the uffd (and, for memfd backing, the memfd) attached, answered
//!   with one JSON line. `{"version":"wset.v1","op":"features"}` asks which
//!   uffd features to request before creating the uffd.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
pub use wset_tracker::Region;

/// The largest handshake message accepted.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The most regions one VM may have.
pub const MAX_REGIONS: usize = 64;
const HUGE_2M: u64 = 2 << 20;
const HUGE_1G: u64 = 1 << 30;

/// One entry of Firecracker's `GuestRegionUffdMapping` array.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct FirecrackerRegion {
    pub base_host_virt_addr: u64,
    pub size: u64,
    pub offset: u64,
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Deprecated; holds bytes despite its name.
    #[serde(default)]
    pub page_size_kib: Option<u64>,
}

/// Which handshake a VMM spoke.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeKind {
    /// Firecracker's page-fault-handler handshake: no reply.
    Firecracker,
    /// wset's own, with a JSON reply.
    WsetV1,
}

impl HandshakeKind {
    /// The name the API, the metrics and the VM records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firecracker => "firecracker",
            Self::WsetV1 => "wset.v1",
        }
    }

    /// From a VM record: anything but `firecracker` spoke wset.v1.
    pub fn from_name(name: &str) -> Self {
        if name == "firecracker" {
            Self::Firecracker
        } else {
            Self::WsetV1
        }
    }
}

/// How a wset.v1 VMM backs guest memory.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backing {
    Anonymous,
    Memfd,
    Hugetlbfs,
}

/// One region in a wset.v1 registration.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct WsetRegion {
    pub host_addr: u64,
    pub size: u64,
    /// Offset in the memfd (memfd/hugetlbfs backing); ignored for anonymous.
    #[serde(default)]
    pub file_offset: u64,
}

/// A wset.v1 message from a VMM.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct WsetHello {
    pub version: String,
    /// `register` (default) or `features`.
    #[serde(default)]
    pub op: Option<String>,
    #[serde(default)]
    pub vm_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub backing: Option<Backing>,
    #[serde(default)]
    pub page_size: Option<u64>,
    #[serde(default)]
    pub regions: Vec<WsetRegion>,
}

/// The agent's answer to a wset.v1 message.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct WsetReply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub vm_id: Option<String>,
    /// Tracking methods chosen, e.g. `["first_touch", "wp_async"]`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub methods: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub granule_bytes: Option<u64>,
    /// Why methods were or were not chosen.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub notes: Vec<String>,
    /// Features the kernel offers (`features` op).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub offered_features: Option<u64>,
    /// Features to request at UFFDIO_API for the best tracking (`features` op).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recommended_features: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub recommended_feature_names: Option<String>,
}

impl WsetReply {
    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            ..Default::default()
        }
    }
}

/// A parsed handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hello {
    Firecracker(Vec<FirecrackerRegion>),
    WsetRegister(WsetHello),
    WsetFeatures { backing: Backing },
}

/// Guest memory as the agent will track it, after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub page_size: u64,
    /// In the guest's own order, which is the order of granule indices and
    /// so of per-region heat: by offset in the memory file when there is
    /// one (Firecracker's snapshot, a memfd), else as the VMM listed them.
    /// VMMs map regions top-down as often as not, so host addresses say
    /// nothing of the guest's layout. The tracker's own region type, so a
    /// validated layout is what the tracker is given.
    pub regions: Vec<Region>,
}

impl Layout {
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }
}

/// Why a handshake was refused. Messages say what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("empty handshake: the peer closed the connection before sending anything")]
    Empty,
    #[error("handshake is not valid JSON: {0}")]
    Json(String),
    #[error("handshake exceeds {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("handshake ended before its JSON was complete ({0} bytes received)")]
    Truncated(usize),
    #[error("unsupported handshake version {0:?}: this agent speaks \"wset.v1\"")]
    Version(String),
    #[error("unknown op {0:?}: expected \"register\" or \"features\"")]
    Op(String),
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error(transparent)]
    BadId(#[from] wset_proto::ids::IdError),
    #[error("no regions: register at least one guest memory region")]
    NoRegions,
    #[error("{0} regions: at most {MAX_REGIONS} are accepted")]
    TooManyRegions(usize),
    #[error("page size {0} is not 4096, 2 MiB or 1 GiB")]
    PageSize(u64),
    #[error("region {index} ({addr:#x}+{size:#x}) is not aligned to the page size {page_size}")]
    Unaligned {
        index: usize,
        addr: u64,
        size: u64,
        page_size: u64,
    },
    #[error("region {index} has size 0")]
    ZeroSize { index: usize },
    #[error("region {index} ({addr:#x}+{size:#x}) wraps around the address space")]
    Wraps { index: usize, addr: u64, size: u64 },
    #[error("regions {a} and {b} overlap ({a_addr:#x}+{a_size:#x} and {b_addr:#x}+{b_size:#x})")]
    Overlap {
        a: usize,
        b: usize,
        a_addr: u64,
        a_size: u64,
        b_addr: u64,
        b_size: u64,
    },
    #[error(
        "guest memory of {total} bytes exceeds this agent's limit of {limit} bytes (--max-vm-bytes)"
    )]
    TooBig { total: u64, limit: u64 },
    #[error("regions {a} and {b} overlap in the memory file")]
    FileOverlap { a: usize, b: usize },
}

/// Parse one handshake message.
pub fn parse(bytes: &[u8]) -> Result<Hello, HandshakeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(HandshakeError::TooLarge);
    }
    let text = trim(bytes);
    match text.first() {
        None => Err(HandshakeError::Empty),
        Some(b'[') => serde_json::from_slice(text)
            .map(Hello::Firecracker)
            .map_err(json_err(text)),
        Some(b'{') => {
            let h: WsetHello = serde_json::from_slice(text).map_err(json_err(text))?;
            if h.version != "wset.v1" {
                return Err(HandshakeError::Version(h.version));
            }
            match h.op.as_deref() {
                None | Some("register") => Ok(Hello::WsetRegister(h)),
                Some("features") => Ok(Hello::WsetFeatures {
                    backing: h.backing.unwrap_or(Backing::Anonymous),
                }),
                Some(other) => Err(HandshakeError::Op(other.to_owned())),
            }
        }
        Some(_) => Err(HandshakeError::Json(
            "expected a JSON array (Firecracker) or object (wset.v1)".into(),
        )),
    }
}

/// Whether reading can stop: `bytes` holds a complete JSON value, or is
/// already invalid in a way more bytes cannot fix (a syntax error that is
/// not an early end). [`parse`] then says which.
pub fn is_complete(bytes: &[u8]) -> bool {
    let text = trim(bytes);
    if text.is_empty() {
        return false;
    }
    let mut de = serde_json::Deserializer::from_slice(text).into_iter::<serde::de::IgnoredAny>();
    match de.next() {
        Some(Ok(_)) => true,
        Some(Err(e)) => !e.is_eof(),
        None => false,
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

fn json_err(text: &[u8]) -> impl Fn(serde_json::Error) -> HandshakeError + '_ {
    move |e| {
        if e.is_eof() {
            HandshakeError::Truncated(text.len())
        } else {
            HandshakeError::Json(e.to_string())
        }
    }
}

/// Check a VM id: the one it is, if it is one.
pub fn check_vm_id(id: &str) -> Result<wset_proto::ids::VmId, HandshakeError> {
    Ok(wset_proto::ids::VmId::parse(id)?)
}

/// Check a host id (`--host-name`).
pub fn check_host_id(id: &str) -> Result<(), HandshakeError> {
    Ok(wset_proto::ids::check_host_id("host_id", id)?)
}

/// Validate Firecracker regions into a layout.
pub fn firecracker_layout(
    regions: &[FirecrackerRegion],
    max_bytes: u64,
) -> Result<Layout, HandshakeError> {
    let page_size = regions
        .first()
        .and_then(|r| r.page_size.or(r.page_size_kib))
        .unwrap_or(4096);
    let rs = regions
        .iter()
        .map(|r| Region {
            host_addr: r.base_host_virt_addr,
            len: r.size,
            file_offset: r.offset,
        })
        .collect();
    validate(page_size, rs, max_bytes, true)
}

/// Validate a wset.v1 registration into a layout.
pub fn wset_layout(h: &WsetHello, max_bytes: u64) -> Result<Layout, HandshakeError> {
    let page_size = h.page_size.unwrap_or(4096);
    let file_backed = matches!(h.backing, Some(Backing::Memfd | Backing::Hugetlbfs));
    let rs = h
        .regions
        .iter()
        .map(|r| Region {
            host_addr: r.host_addr,
            len: r.size,
            file_offset: if file_backed { r.file_offset } else { 0 },
        })
        .collect();
    validate(page_size, rs, max_bytes, file_backed)
}

/// Check a layout; with `file_backed`, also that no two regions share bytes
/// of the file, and order the regions by file offset.
fn validate(
    page_size: u64,
    mut rs: Vec<Region>,
    max_bytes: u64,
    file_backed: bool,
) -> Result<Layout, HandshakeError> {
    if ![4096, HUGE_2M, HUGE_1G].contains(&page_size) {
        return Err(HandshakeError::PageSize(page_size));
    }
    if rs.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    if rs.len() > MAX_REGIONS {
        return Err(HandshakeError::TooManyRegions(rs.len()));
    }
    let mut total: u64 = 0;
    for (index, r) in rs.iter().enumerate() {
        if r.len == 0 {
            return Err(HandshakeError::ZeroSize { index });
        }
        if r.host_addr % page_size != 0 || r.len % page_size != 0 || r.file_offset % page_size != 0
        {
            return Err(HandshakeError::Unaligned {
                index,
                addr: r.host_addr,
                size: r.len,
                page_size,
            });
        }
        if r.host_addr.checked_add(r.len).is_none() || r.file_offset.checked_add(r.len).is_none() {
            return Err(HandshakeError::Wraps {
                index,
                addr: r.host_addr,
                size: r.len,
            });
        }
        total = total.saturating_add(r.len);
    }
    if total > max_bytes {
        return Err(HandshakeError::TooBig {
            total,
            limit: max_bytes,
        });
    }
    let mut order: Vec<usize> = (0..rs.len()).collect();
    order.sort_by_key(|&i| rs[i].host_addr);
    for w in order.windows(2) {
        let (a, b) = (rs[w[0]], rs[w[1]]);
        if a.host_addr + a.len > b.host_addr {
            let (ia, ib) = (w[0].min(w[1]), w[0].max(w[1]));
            let (ra, rb) = (rs[ia], rs[ib]);
            return Err(HandshakeError::Overlap {
                a: ia,
                b: ib,
                a_addr: ra.host_addr,
                a_size: ra.len,
                b_addr: rb.host_addr,
                b_size: rb.len,
            });
        }
    }
    if file_backed {
        let mut by_off: Vec<usize> = (0..rs.len()).collect();
        by_off.sort_by_key(|&i| rs[i].file_offset);
        for w in by_off.windows(2) {
            if rs[w[0]].file_offset + rs[w[0]].len > rs[w[1]].file_offset {
                return Err(HandshakeError::FileOverlap {
                    a: w[0].min(w[1]),
                    b: w[0].max(w[1]),
                });
            }
        }
    }
    if file_backed {
        rs.sort_by_key(|r| r.file_offset);
    }
    Ok(Layout {
        page_size,
        regions: rs,
    })
}

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    pub path: String,
}

/// Parse `/proc/<pid>/maps`; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<MapsEntry> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_ascii_whitespace();
            let (range, perms, off, _dev, ino) =
                (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
            let path = it.collect::<Vec<_>>().join(" ");
            let (s, e) = range.split_once('-')?;
            Some(MapsEntry {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms: perms.to_owned(),
                shared: perms.as_bytes().get(3) == Some(&b's'),
                offset: u64::from_str_radix(off, 16).ok()?,
                inode: ino.parse().ok()?,
                path,
            })
        })
        .collect()
}

/// Bytes of `AnonHugePages` (transparent huge pages) in `/proc/<pid>/smaps`
/// text, counted for the mappings that overlap the layout's regions.
pub fn thp_bytes(smaps: &str, layout: &Layout) -> u64 {
    let mut total: u64 = 0;
    let mut overlaps = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((s, e)) = range.split_once('-')
            && let (Ok(s), Ok(e)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
        {
            overlaps = layout
                .regions
                .iter()
                .any(|r| s < r.host_addr + r.len && r.host_addr < e);
        } else if overlaps && let Some(v) = line.strip_prefix("AnonHugePages:") {
            total = total.saturating_add(
                v.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    .saturating_mul(1024),
            );
        }
    }
    total
}

/// Why a region does not match the VMM's mappings.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("region {index} ({addr:#x}+{len:#x}): {at:#x} is not mapped in the VMM process")]
    NotMapped {
        index: usize,
        addr: u64,
        len: u64,
        at: u64,
    },
    #[error(
        "region {index} ({addr:#x}+{len:#x}): {at:#x} is mapped {perms} in the VMM process, \
         not readable and writable"
    )]
    NotWritable {
        index: usize,
        addr: u64,
        len: u64,
        at: u64,
        perms: String,
    },
    #[error(
        "region {index} ({addr:#x}+{len:#x}): {at:#x} maps the file {path:?}, not anonymous memory"
    )]
    FileBacked {
        index: usize,
        addr: u64,
        len: u64,
        at: u64,
        path: String,
    },
    #[error(
        "region {index} ({addr:#x}+{len:#x}): {at:#x} does not map the passed memfd shared at \
         offset {want_offset:#x} (maps: inode {inode} offset {} {} {path:?})",
        got_offset.map_or_else(|| "beyond 2^64".to_owned(), |o| format!("{o:#x}")),
        if *shared { "shared" } else { "private" }
    )]
    WrongFile {
        index: usize,
        addr: u64,
        len: u64,
        at: u64,
        want_offset: u64,
        inode: u64,
        /// `None` when the maps text's offset would pass 2^64.
        got_offset: Option<u64>,
        shared: bool,
        path: String,
    },
}

/// Check that every region is mapped in the peer, contiguously, readable and
/// writable; for file-backed memory, that it maps `memory_ino` shared at the
/// stated offsets; for anonymous memory, that it maps no file.
pub fn check_mapped(
    layout: &Layout,
    maps: &[MapsEntry],
    memory_ino: Option<u64>,
) -> Result<(), MappingError> {
    for (index, r) in layout.regions.iter().enumerate() {
        let (addr, len) = (r.host_addr, r.len);
        let end = addr + len;
        let mut at = addr;
        while at < end {
            let Some(m) = maps.iter().find(|m| m.start <= at && at < m.end) else {
                return Err(MappingError::NotMapped {
                    index,
                    addr,
                    len,
                    at,
                });
            };
            if !m.perms.starts_with("rw") {
                return Err(MappingError::NotWritable {
                    index,
                    addr,
                    len,
                    at,
                    perms: m.perms.clone(),
                });
            }
            // Anonymous hugetlb memory (MAP_HUGETLB, as Firecracker maps
            // `huge_pages` guests) has an inode of the kernel's own.
            let anon_huge = m.path.starts_with("/anon_hugepage");
            if memory_ino.is_none() && m.inode != 0 && !anon_huge {
                return Err(MappingError::FileBacked {
                    index,
                    addr,
                    len,
                    at,
                    path: m.path.clone(),
                });
            }
            if let Some(ino) = memory_ino {
                // The layout was checked not to overflow; the maps text is
                // not trusted to, and an offset past 2^64 matches nothing.
                let want_offset = r.file_offset + (at - addr);
                let got_offset = m.offset.checked_add(at - m.start);
                if m.inode != ino || !m.shared || got_offset != Some(want_offset) {
                    return Err(MappingError::WrongFile {
                        index,
                        addr,
                        len,
                        at,
                        want_offset,
                        inode: m.inode,
                        got_offset,
                        shared: m.shared,
                        path: m.path.clone(),
                    });
                }
            }
            at = m.end;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FC: &str = r#"[{"base_host_virt_addr":140737488355328,"size":268435456,"offset":0,"page_size":4096,"page_size_kib":4096},
        {"base_host_virt_addr":140737756790784,"size":4096,"offset":268435456,"page_size":4096,"page_size_kib":4096,"future":1}]"#;

    #[test]
    fn firecracker_message_parses_with_unknown_fields() {
        let Hello::Firecracker(rs) = parse(FC.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(rs.len(), 2);
        assert_eq!(rs[1].offset, 268435456);
        let l = firecracker_layout(&rs, u64::MAX).unwrap();
        assert_eq!(l.total_bytes(), 268435456 + 4096);
        assert!(is_complete(FC.as_bytes()));
        assert!(!is_complete(&FC.as_bytes()[..40]));
        assert!(
            is_complete(b"{\"version\": bogus"),
            "a syntax error ends reading"
        );
        assert!(is_complete(b"hello"));
    }

    /// `(case, message, expected error text fragment)`
    #[test]
    fn bad_messages_say_what_is_wrong() {
        let cases: &[(&str, &str, &str)] = &[
            ("empty", "  ", "empty handshake"),
            ("garbage", "hello", "expected a JSON array"),
            ("truncated", r#"[{"base_host_virt_addr":1"#, "ended before"),
            ("bad json", r#"{"version": }"#, "not valid JSON"),
            (
                "version",
                r#"{"version":"wset.v9"}"#,
                "unsupported handshake version",
            ),
            ("op", r#"{"version":"wset.v1","op":"dance"}"#, "unknown op"),
            (
                "fc wrong type",
                r#"[{"base_host_virt_addr":"x","size":1,"offset":0}]"#,
                "not valid JSON",
            ),
        ];
        for (name, msg, want) in cases {
            let err = parse(msg.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        assert_eq!(
            parse(&vec![b' '; MAX_MESSAGE_BYTES + 1]),
            Err(HandshakeError::TooLarge)
        );
    }

    fn regions(rs: &[(u64, u64)]) -> Vec<FirecrackerRegion> {
        let mut off = 0;
        rs.iter()
            .map(|&(a, s)| {
                let r = FirecrackerRegion {
                    base_host_virt_addr: a,
                    size: s,
                    offset: off,
                    page_size: Some(4096),
                    page_size_kib: None,
                };
                off += s;
                r
            })
            .collect()
    }

    #[test]
    fn layouts_are_checked() {
        type Case = (&'static str, Vec<(u64, u64)>, &'static str);
        let cases: &[Case] = &[
            ("none", vec![], "no regions"),
            ("zero", vec![(0x1000, 0)], "size 0"),
            ("unaligned addr", vec![(0x1001, 0x1000)], "not aligned"),
            ("unaligned size", vec![(0x1000, 0x1800)], "not aligned"),
            (
                "overlap",
                vec![(0x10000, 0x4000), (0x12000, 0x4000)],
                "overlap",
            ),
            ("wraps", vec![(u64::MAX - 0xfff, 0x2000)], "wraps"),
            ("too big", vec![(0x1000, 1 << 41)], "exceeds"),
        ];
        for (name, rs, want) in cases {
            let err = firecracker_layout(&regions(rs), 1 << 40)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
        // Mapped top-down: the second region in the file lies lower in
        // the VMM. The layout follows the file (the guest's order).
        let top_down = [
            FirecrackerRegion {
                base_host_virt_addr: 0x30000,
                size: 0x2000,
                offset: 0,
                page_size: Some(4096),
                page_size_kib: None,
            },
            FirecrackerRegion {
                base_host_virt_addr: 0x10000,
                size: 0x1000,
                offset: 0x2000,
                page_size: Some(4096),
                page_size_kib: None,
            },
        ];
        let ok = firecracker_layout(&top_down, 1 << 40).unwrap();
        let order: Vec<(u64, u64)> = ok
            .regions
            .iter()
            .map(|r| (r.file_offset, r.host_addr))
            .collect();
        assert_eq!(order, [(0, 0x30000), (0x2000, 0x10000)], "in file order");
        let swapped = [top_down[1].clone(), top_down[0].clone()];
        assert_eq!(
            firecracker_layout(&swapped, 1 << 40).unwrap(),
            ok,
            "whatever order they came in"
        );
        let many: Vec<(u64, u64)> = (0..65).map(|i| (0x1000 * (2 * i + 1), 0x1000)).collect();
        assert!(
            firecracker_layout(&regions(&many), 1 << 40)
                .unwrap_err()
                .to_string()
                .contains("at most")
        );
    }

    #[test]
    fn wset_register_parses() {
        let m = r#"{"version":"wset.v1","vm_id":"vm-1","name":"web","labels":{"tier":"gold"},
            "backing":"memfd","regions":[{"host_addr":4096,"size":8192,"file_offset":0}]}"#;
        let Hello::WsetRegister(h) = parse(m.as_bytes()).unwrap() else {
            panic!()
        };
        assert_eq!(h.backing, Some(Backing::Memfd));
        assert_eq!(h.labels["tier"], "gold");
        assert_eq!(wset_layout(&h, 1 << 30).unwrap().total_bytes(), 8192);
        assert!(check_vm_id("vm-1").is_ok());
        assert!(check_vm_id("../etc").is_err());
        assert!(check_vm_id("").is_err());
        let f = parse(br#"{"version":"wset.v1","op":"features","backing":"memfd"}"#).unwrap();
        assert_eq!(
            f,
            Hello::WsetFeatures {
                backing: Backing::Memfd
            }
        );
    }

    #[test]
    fn thp_is_counted_for_overlapping_mappings_only() {
        let smaps = "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 \n\
                     Size:               4096 kB\n\
                     AnonHugePages:      2048 kB\n\
                     7f1000000000-7f1000400000 rw-p 00000000 00:00 0 \n\
                     AnonHugePages:      4096 kB\n";
        let l = Layout {
            page_size: 4096,
            regions: vec![Region {
                host_addr: 0x7f00_0010_0000,
                len: 0x1000,
                file_offset: 0,
            }],
        };
        assert_eq!(thp_bytes(smaps, &l), 2 << 20);
    }

    #[test]
    fn maps_cover_regions() {
        let maps = parse_maps(
            "7f0000000000-7f0000002000 rw-s 00000000 00:01 1234 /memfd:guest (deleted)\n\
             7f0000002000-7f0000004000 rw-s 00002000 00:01 1234 /memfd:guest (deleted)\n\
             7f1000000000-7f1000001000 rw-p 00000000 00:00 0 \n\
             7f1000001000-7f1000002000 ---p 00000000 00:00 0 \n",
        );
        assert_eq!(maps.len(), 4);
        let l = |addr, size, off| Layout {
            page_size: 4096,
            regions: vec![Region {
                host_addr: addr,
                len: size,
                file_offset: off,
            }],
        };
        assert!(check_mapped(&l(0x7f00_0000_0000, 0x4000, 0), &maps, Some(1234)).is_ok());
        let e = check_mapped(&l(0x7f00_0000_0000, 0x5000, 0), &maps, Some(1234)).unwrap_err();
        assert!(
            matches!(
                e,
                MappingError::NotMapped {
                    at: 0x7f00_0000_4000,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("not mapped"), "{e}");
        let e = check_mapped(&l(0x7f00_0000_0000, 0x4000, 0x1000), &maps, Some(1234)).unwrap_err();
        assert!(
            e.to_string().contains("does not map the passed memfd"),
            "{e}"
        );
        let e = check_mapped(&l(0x7f10_0000_0000, 0x1000, 0), &maps, Some(1234)).unwrap_err();
        assert!(e.to_string().contains("private"), "{e}");
        assert!(check_mapped(&l(0x7f10_0000_0000, 0x1000, 0), &maps, None).is_ok());
        let e = check_mapped(&l(0x7f10_0000_0000, 0x2000, 0), &maps, None).unwrap_err();
        assert!(e.to_string().contains("not readable and writable"), "{e}");
        let e = check_mapped(&l(0x7f00_0000_0000, 0x1000, 0), &maps, None).unwrap_err();
        assert!(e.to_string().contains("not anonymous memory"), "{e}");
        let huge = parse_maps(
            "7f2000000000-7f2000400000 rw-p 00000000 00:10 4321 /anon_hugepage (deleted)\n",
        );
        assert!(
            check_mapped(&l(0x7f20_0000_0000, 0x40_0000, 0), &huge, None).is_ok(),
            "anonymous hugetlb memory is anonymous"
        );
        // A maps offset near 2^64 (found by the handshake fuzz target) is a
        // mismatch, not an overflow.
        let wild =
            parse_maps("7f0000000000-7f0004000000 rw-s fffffffffffff000 00:01 1234 /memfd:guest\n");
        let e = check_mapped(&l(0x7f00_0300_0000, 0x1000, 0), &wild, Some(1234)).unwrap_err();
        assert!(e.to_string().contains("offset beyond 2^64"), "{e}");
        let huge = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0\n\
                    AnonHugePages: 18446744073709551615 kB\n\
                    7f0000200000-7f0000400000 rw-p 00000000 00:00 0\n\
                    AnonHugePages: 18446744073709551615 kB\n";
        assert_eq!(
            thp_bytes(huge, &l(0x7f00_0000_0000, 0x40_0000, 0)),
            u64::MAX
        );
    }
}
