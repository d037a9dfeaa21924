//! Choosing tracking methods for one VM from what its uffd and memory allow.
//! Pure: no IO. Every choice and every refusal carries a reason a VMM author
//! can act on; they end up in the handshake reply and the summaries.

#![forbid(unsafe_code)]

use crate::uffd::{feature, mode};

/// How the guest memory is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackingKind {
    /// Private anonymous memory (Firecracker's guest memory, most VMMs).
    Anonymous,
    /// A memfd / shmem mapping `MAP_SHARED`, whose fd the agent holds.
    Shmem,
    /// A hugetlbfs memfd (2 MiB pages) mapped `MAP_SHARED`, whose fd the agent holds.
    Hugetlb,
}

/// What the operator asks of the read-tracking method on shmem guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessMode {
    /// No read tracking beyond first touch.
    Off,
    /// Watch a random sample of this many granules (ESX-style).
    Sampled { granules: u32 },
    /// Watch every granule.
    Exhaustive,
}

/// Dirty tracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dirty {
    None,
    /// UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN(PAGE_IS_WRITTEN).
    WpAsync,
    /// Synchronous write-protect faults on every page, re-armed each interval.
    WpSync,
    /// Writes seen on the pages the access method watches (it freezes each
    /// one with a write-protect when it re-arms it): exact when every page is
    /// watched, a sample estimate otherwise. No fault on unwatched pages.
    Watched,
    /// Soft-dirty bits, harvested with PAGEMAP_SCAN(PAGE_IS_SOFT_DIRTY) and
    /// reset through `/proc/<pid>/clear_refs`: every write on every page, no
    /// fault message. Used on RWP VMs, where write-protect cannot be (a VMA
    /// is write-tracked or access-tracked, not both).
    SoftDirty,
}

/// What the operator asks of RWP (Linux 7.3+) where the uffd allows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RwpMode {
    /// Never use RWP: mainline methods only.
    Off,
    /// The kernel resolves accesses; harvested each interval (the default).
    Async,
    /// Every first access after protection is a fault message served by the
    /// tracker: per-fault read/write detail, at one round trip per access.
    Sync,
}

/// One tracking method, as summaries and replies name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    FirstTouch,
    WpAsync,
    WpSync,
    ShmemSampled,
    ShmemExhaustive,
    RwpAsync,
    RwpSync,
    SoftDirty,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::FirstTouch => "first_touch",
            Method::WpAsync => "wp_async",
            Method::WpSync => "wp_sync",
            Method::ShmemSampled => "shmem_sampled",
            Method::ShmemExhaustive => "shmem_exhaustive",
            Method::RwpAsync => "rwp_async",
            Method::RwpSync => "rwp_sync",
            Method::SoftDirty => "soft_dirty",
        }
    }
}

/// Read (and write) tracking beyond first touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    None,
    /// Custody and hole punching on a sample of granules.
    ShmemSampled {
        granules: u32,
    },
    /// Custody and hole punching on every granule.
    ShmemExhaustive,
    /// Linux 7.3+ read/write-protect mode on every page; `sync` serves each
    /// access as a fault message, otherwise the kernel resolves accesses and
    /// the tracker harvests them.
    Rwp {
        sync: bool,
    },
}

/// The methods chosen for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// `UFFDIO_REGISTER_MODE_*` bits for every region.
    pub register_mode: u64,
    /// MISSING faults are recorded (and served).
    pub first_touch: bool,
    pub dirty: Dirty,
    pub access: Access,
    /// Cold-page eviction (RWP VMs on memfd or hugetlbfs memory): a present
    /// page not accessed for this many whole intervals is saved to custody
    /// and its memory freed; the next access brings it back. 0: never.
    pub evict_after: u32,
    /// Why each method was or was not chosen.
    pub notes: Vec<String>,
}

impl Plan {
    /// The methods in force, in a stable order.
    pub fn methods(&self) -> Vec<Method> {
        let mut m = Vec::new();
        if self.first_touch {
            m.push(Method::FirstTouch);
        }
        match self.dirty {
            Dirty::WpAsync => m.push(Method::WpAsync),
            Dirty::WpSync => m.push(Method::WpSync),
            Dirty::SoftDirty => m.push(Method::SoftDirty),
            Dirty::Watched | Dirty::None => {}
        }
        match self.access {
            Access::ShmemSampled { .. } => m.push(Method::ShmemSampled),
            Access::ShmemExhaustive => m.push(Method::ShmemExhaustive),
            Access::Rwp { sync: false } => m.push(Method::RwpAsync),
            Access::Rwp { sync: true } => m.push(Method::RwpSync),
            Access::None => {}
        }
        m
    }
}

/// What [`plan`] needs to know.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput {
    /// The uffd's features, fixed by its creator.
    pub features: u64,
    /// The features the running kernel offers (to tell a VMM what it missed).
    pub offered: u64,
    pub rwp: RwpMode,
    pub backing: BackingKind,
    pub access_mode: AccessMode,
    /// The VMM holds its own copy of the uffd, so if the agent dies a punched
    /// page faults (and waits) instead of reading back as zeros.
    pub vmm_holds_uffd: bool,
    /// The agent holds the memory's fd (memfd), needed to save and punch pages.
    pub have_memory_fd: bool,
    /// Granules in the VM.
    pub granules: u32,
    /// Custody slots available to exhaustive tracking.
    pub custody_granules: u32,
    /// Track writes on every page with sync write-protect even when reads
    /// are sampled (exact dirty bytes, at one fault per first write per
    /// page per interval).
    pub exact_dirty: bool,
    /// Evict pages not accessed for this many intervals (0: never); done
    /// only under RWP, on memory the agent can save and punch.
    pub evict_after: u32,
    /// The kernel keeps soft-dirty bits (`CONFIG_MEM_SOFT_DIRTY`; see
    /// [`crate::sys::soft_dirty_supported`]).
    pub soft_dirty: bool,
    /// The VMM registered the ranges for MISSING faults itself (Firecracker
    /// does), so they arrive whatever feature bits the uffd was given.
    pub missing_registered: bool,
    /// Where the uffd lacks WP_ASYNC, track writes by synchronous
    /// write-protect even though soft-dirty bits could: exact to the fault,
    /// but every first write per interval waits for the agent, so a dead
    /// agent stops the guest at its next such write.
    pub sync_write_protect: bool,
}

/// Features a VMM should request at `UFFDIO_API` time for the best tracking
/// on a kernel offering `offered`, for memory backed as `backing`.
pub fn recommended_features(offered: u64, backing: BackingKind) -> u64 {
    let mut want = feature::EVENT_REMOVE | feature::EVENT_UNMAP | feature::THREAD_ID;
    if offered & feature::RWP != 0 {
        // RWP tracks reads and writes on every backing; write-protect is not
        // used beside it (a VMA is write-tracked or access-tracked).
        want |= feature::RWP | feature::RWP_ASYNC;
        match backing {
            BackingKind::Anonymous => {}
            BackingKind::Shmem => want |= feature::MISSING_SHMEM,
            BackingKind::Hugetlb => want |= feature::MISSING_HUGETLBFS,
        }
        return want & offered;
    }
    match backing {
        BackingKind::Anonymous => want |= feature::WP_ASYNC | feature::WP_UNPOPULATED,
        BackingKind::Shmem => want |= feature::MISSING_SHMEM | feature::WP_HUGETLBFS_SHMEM,
        BackingKind::Hugetlb => want |= feature::MISSING_HUGETLBFS | feature::WP_HUGETLBFS_SHMEM,
    }
    want & offered
}

/// Choose methods. Never fails: a VM whose uffd allows nothing better is
/// still tracked by first touch, and the notes say why.
pub fn plan(input: PlanInput) -> Plan {
    let f = input.features;
    let mut notes = Vec::new();
    let missing_ok = input.missing_registered
        || match input.backing {
            BackingKind::Anonymous => true,
            BackingKind::Shmem => f & feature::MISSING_SHMEM != 0,
            BackingKind::Hugetlb => f & feature::MISSING_HUGETLBFS != 0,
        };
    if !missing_ok {
        notes.push(format!(
            "first-touch off: the uffd lacks {} (request it at UFFDIO_API)",
            if input.backing == BackingKind::Hugetlb {
                "MISSING_HUGETLBFS"
            } else {
                "MISSING_SHMEM"
            }
        ));
    }

    let rwp_ok = f & feature::RWP != 0;
    if !rwp_ok && input.offered & feature::RWP != 0 && input.rwp != RwpMode::Off {
        notes.push(
            "RWP off: the kernel offers read/write-protect mode but this uffd was created \
             without UFFD_FEATURE_RWP (a uffd's features are fixed at UFFDIO_API, as \
             Firecracker's are); request RWP|RWP_ASYNC there for every read and write"
                .into(),
        );
    }
    if rwp_ok && input.rwp != RwpMode::Off && input.access_mode != AccessMode::Off {
        let sync = input.rwp == RwpMode::Sync;
        notes.push(if sync {
            "read/write-protect mode (Linux 7.3+), sync: every first access per interval is a \
             fault message, classified read or write"
                .into()
        } else {
            "read/write-protect mode (Linux 7.3+), async: the kernel resolves accesses, the \
             tracker harvests them with PAGEMAP_SCAN each interval"
                .into()
        });
        let dirty = if input.backing == BackingKind::Hugetlb {
            notes.push(
                "writes not tracked: the kernel keeps no soft-dirty bits on hugetlbfs and \
                 write-protect cannot share a VMA with RWP (--rwp off tracks writes there, \
                 through custody)"
                    .into(),
            );
            Dirty::None
        } else {
            notes.push(
                "writes by soft-dirty bits: the agent resets them through /proc/<pid>/clear_refs, \
                 for the VMM's whole address space"
                    .into(),
            );
            Dirty::SoftDirty
        };
        let evict_after = match eviction_refused(input, missing_ok) {
            _ if input.evict_after == 0 => 0,
            Some(why) => {
                notes.push(format!("cold pages not evicted: {why}"));
                0
            }
            None => {
                notes.push(format!(
                    "cold pages evicted: a page not accessed for {} intervals is saved to the \
                     agent's custody file and its memory freed; its next access brings it back",
                    input.evict_after
                ));
                input.evict_after
            }
        };
        let mut register_mode = mode::RWP;
        if missing_ok {
            register_mode |= mode::MISSING;
        }
        return Plan {
            register_mode,
            first_touch: missing_ok,
            dirty,
            access: Access::Rwp { sync },
            evict_after,
            notes,
        };
    }
    if rwp_ok && input.rwp == RwpMode::Off {
        notes.push("RWP off by configuration (--rwp off)".into());
    }
    if input.evict_after > 0 {
        notes.push(
            "cold pages not evicted: eviction needs read/write-protect mode (Linux 7.3+), which \
             freezes a cold page while it is saved without a fault on every hot one"
                .into(),
        );
    }

    let access = match (input.backing, input.access_mode) {
        (_, AccessMode::Off) => {
            notes.push("read tracking off by configuration".into());
            Access::None
        }
        (BackingKind::Anonymous, _) => {
            notes.push(
                "reads of present pages are not observable on private anonymous memory before \
                 Linux 7.3 (RWP); back guest memory with a memfd for read tracking"
                    .into(),
            );
            Access::None
        }
        (_, _) if !missing_ok => {
            notes.push("read tracking off: it needs MISSING faults on this memory".into());
            Access::None
        }
        (_, _) if !input.have_memory_fd => {
            notes.push("read tracking off: the handshake did not pass the memory's fd".into());
            Access::None
        }
        (_, _) if !input.vmm_holds_uffd => {
            notes.push(
                "read tracking off: the VMM does not keep its own copy of the uffd, so pages in \
                 the agent's custody would read back as zeros if the agent died"
                    .into(),
            );
            Access::None
        }
        (_, _) if f & feature::WP_ASYNC != 0 => {
            // With WP_ASYNC the kernel resolves every write-protect fault
            // itself, so the freeze before saving a page would not stop a
            // write, and a write between the save and the hole punch would be
            // lost. Never sample such a uffd.
            notes.push(
                "read tracking off: the uffd was created with WP_ASYNC, under which a page cannot \
                 be frozen before it is saved; create it without WP_ASYNC for read tracking"
                    .into(),
            );
            Access::None
        }
        (_, AccessMode::Exhaustive) if input.custody_granules < input.granules => {
            notes.push(format!(
                "exhaustive tracking needs custody for all {} granules but {} are allowed \
                 (--custody-max-bytes): sampling that many instead",
                input.granules, input.custody_granules
            ));
            Access::ShmemSampled {
                granules: input.custody_granules,
            }
        }
        (_, AccessMode::Exhaustive) => Access::ShmemExhaustive,
        (_, AccessMode::Sampled { granules }) if granules >= input.granules => {
            notes.push("sample covers every granule: tracking exhaustively".into());
            Access::ShmemExhaustive
        }
        (_, AccessMode::Sampled { granules }) => Access::ShmemSampled { granules },
    };

    // Sampling freezes a page with a synchronous write-protect before saving
    // it, so it rules out WP_ASYNC (which would let a write through and lose it
    // to the hole punch). The same freeze shows writes on the watched pages.
    let dirty = if access != Access::None {
        if input.exact_dirty && access != Access::ShmemExhaustive {
            notes.push(
                "writes tracked on every page by sync write-protect (exact dirty requested)".into(),
            );
            Dirty::WpSync
        } else {
            if access != Access::ShmemExhaustive {
                notes.push("writes sampled on the watched pages, like reads".into());
            }
            Dirty::Watched
        }
    } else if f & feature::WP_ASYNC != 0 {
        Dirty::WpAsync
    } else if input.sync_write_protect {
        notes.push(
            "writes by sync write-protect (asked for; the uffd lacks WP_ASYNC): every first \
             write to a page per interval waits for the agent, so while no agent runs the \
             guest stops at its next such write"
                .into(),
        );
        Dirty::WpSync
    } else if input.soft_dirty && input.backing != BackingKind::Hugetlb {
        notes.push(
            "writes by soft-dirty bits (the uffd lacks WP_ASYNC): no write waits for the agent; \
             the agent resets them through /proc/<pid>/clear_refs, for the VMM's whole address \
             space. In the interval a page arrives, a write after the read that brought it is \
             not seen (the kernel marks every page it fills dirty)"
                .into(),
        );
        Dirty::SoftDirty
    } else {
        notes.push(
            if input.backing == BackingKind::Hugetlb {
                "writes not tracked, so no write waits for the agent: the uffd lacks WP_ASYNC and \
             the kernel keeps no soft-dirty bits on hugetlbfs; --sync-write-protect tracks them \
             exactly, but then every first write to a page per interval waits for the agent, \
             and the guest stops while none runs"
            } else {
                "writes not tracked, so no write waits for the agent: the uffd lacks WP_ASYNC and \
             the kernel keeps no soft-dirty bits (CONFIG_MEM_SOFT_DIRTY); --sync-write-protect \
             tracks them exactly, but then every first write to a page per interval waits for \
             the agent, and the guest stops while none runs"
            }
            .into(),
        );
        Dirty::None
    };

    // Write-protect is registered only for the methods that use it: a
    // range registered for it alone never makes a guest wait.
    let mut register_mode = match dirty {
        Dirty::WpAsync | Dirty::WpSync | Dirty::Watched => mode::WP,
        Dirty::SoftDirty | Dirty::None => 0,
    };
    if missing_ok {
        register_mode |= mode::MISSING;
    }
    Plan {
        register_mode,
        first_touch: missing_ok,
        dirty,
        access,
        evict_after: 0,
        notes,
    }
}

/// Why an RWP VM's cold pages cannot be evicted, if they cannot.
fn eviction_refused(input: PlanInput, missing_ok: bool) -> Option<&'static str> {
    if input.backing == BackingKind::Anonymous {
        Some(
            "the agent cannot free private anonymous memory of another process; back guest \
             memory with a memfd",
        )
    } else if !missing_ok {
        Some("an evicted page comes back on a MISSING fault, which this uffd cannot take")
    } else if !input.have_memory_fd {
        Some("the handshake did not pass the memory's fd")
    } else if !input.vmm_holds_uffd {
        Some(
            "the VMM does not keep its own copy of the uffd, so an evicted page would read back \
             as zeros if the agent died",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(features: u64, backing: BackingKind) -> PlanInput {
        PlanInput {
            features,
            offered: 0x1ffff,
            rwp: RwpMode::Async,
            backing,
            access_mode: AccessMode::Sampled { granules: 1024 },
            vmm_holds_uffd: true,
            have_memory_fd: true,
            granules: 16384,
            custody_granules: 16384,
            exact_dirty: false,
            evict_after: 0,
            soft_dirty: true,
            missing_registered: false,
            sync_write_protect: false,
        }
    }

    /// Eviction is planned only where an evicted page can come back: RWP,
    /// memory the agent can save and punch, MISSING faults, and a VMM that
    /// keeps its uffd. Each refusal says why.
    #[test]
    fn eviction_only_where_a_page_can_come_back() {
        let rwp = feature::RWP | feature::RWP_ASYNC;
        let with = |p: PlanInput| PlanInput {
            evict_after: 8,
            ..p
        };
        let cases = [
            (
                "rwp memfd",
                with(input(rwp | feature::MISSING_SHMEM, BackingKind::Shmem)),
                8,
                "",
            ),
            (
                "rwp hugetlbfs",
                with(input(
                    rwp | feature::MISSING_HUGETLBFS,
                    BackingKind::Hugetlb,
                )),
                8,
                "",
            ),
            (
                "rwp anonymous",
                with(input(rwp, BackingKind::Anonymous)),
                0,
                "private anonymous",
            ),
            (
                "no MISSING",
                with(input(rwp, BackingKind::Shmem)),
                0,
                "MISSING fault",
            ),
            (
                "no memfd",
                PlanInput {
                    have_memory_fd: false,
                    ..with(input(rwp | feature::MISSING_SHMEM, BackingKind::Shmem))
                },
                0,
                "memory's fd",
            ),
            (
                "VMM dropped its uffd",
                PlanInput {
                    vmm_holds_uffd: false,
                    ..with(input(rwp | feature::MISSING_SHMEM, BackingKind::Shmem))
                },
                0,
                "zeros",
            ),
            (
                "no RWP",
                with(input(feature::MISSING_SHMEM, BackingKind::Shmem)),
                0,
                "needs read/write-protect",
            ),
            (
                "not asked",
                input(rwp | feature::MISSING_SHMEM, BackingKind::Shmem),
                0,
                "",
            ),
        ];
        for (name, inp, after, why) in cases {
            let p = plan(inp);
            assert_eq!(p.evict_after, after, "{name}: {:?}", p.notes);
            let said = p.notes.iter().find(|n| n.contains("cold pages"));
            match (after, why) {
                (0, "") => assert!(said.is_none(), "{name}: {:?}", p.notes),
                (0, why) => assert!(
                    said.is_some_and(|n| n.contains("not evicted") && n.contains(why)),
                    "{name}: {:?}",
                    p.notes
                ),
                _ => assert!(
                    said.is_some_and(|n| n.contains("evicted: a page not accessed for 8")),
                    "{name}: {:?}",
                    p.notes
                ),
            }
        }
    }

    /// `(case, input, first_touch, dirty, access)`
    #[test]
    fn table() {
        use Access::*;
        use BackingKind::*;
        let fc = feature::EVENT_REMOVE;
        let anon = feature::EVENT_REMOVE | feature::WP_ASYNC | feature::WP_UNPOPULATED;
        let shmem = feature::EVENT_REMOVE | feature::MISSING_SHMEM;
        let rwp = feature::RWP | feature::RWP_ASYNC;
        let sampled = ShmemSampled { granules: 1024 };
        let exhaustive = AccessMode::Exhaustive;
        let cases = [
            (
                "firecracker uffd",
                input(fc, Anonymous),
                true,
                Dirty::SoftDirty,
                None,
            ),
            (
                "anon with WP_ASYNC",
                input(anon, Anonymous),
                true,
                Dirty::WpAsync,
                None,
            ),
            (
                "shmem sampled",
                input(shmem, Shmem),
                true,
                Dirty::Watched,
                sampled,
            ),
            (
                "shmem sampled, exact dirty",
                PlanInput {
                    exact_dirty: true,
                    ..input(shmem, Shmem)
                },
                true,
                Dirty::WpSync,
                sampled,
            ),
            (
                "shmem exhaustive (exact dirty is implied)",
                PlanInput {
                    access_mode: exhaustive,
                    exact_dirty: true,
                    ..input(shmem, Shmem)
                },
                true,
                Dirty::Watched,
                ShmemExhaustive,
            ),
            (
                "exhaustive beyond custody",
                PlanInput {
                    access_mode: exhaustive,
                    custody_granules: 100,
                    ..input(shmem, Shmem)
                },
                true,
                Dirty::Watched,
                ShmemSampled { granules: 100 },
            ),
            (
                "shmem without MISSING_SHMEM",
                input(feature::EVENT_REMOVE, Shmem),
                false,
                Dirty::SoftDirty,
                None,
            ),
            (
                "shmem, VMM dropped its uffd",
                PlanInput {
                    vmm_holds_uffd: false,
                    ..input(shmem, Shmem)
                },
                true,
                Dirty::SoftDirty,
                None,
            ),
            // A uffd with WP_ASYNC cannot freeze pages: never sampled.
            (
                "shmem with WP_ASYNC",
                input(shmem | feature::WP_ASYNC, Shmem),
                true,
                Dirty::WpAsync,
                None,
            ),
            (
                "shmem with WP_ASYNC, access off",
                PlanInput {
                    access_mode: AccessMode::Off,
                    ..input(shmem | feature::WP_ASYNC, Shmem)
                },
                true,
                Dirty::WpAsync,
                None,
            ),
            (
                "sample larger than VM",
                PlanInput {
                    granules: 512,
                    ..input(shmem, Shmem)
                },
                true,
                Dirty::Watched,
                ShmemExhaustive,
            ),
            (
                "hugetlb",
                input(feature::MISSING_HUGETLBFS, Hugetlb),
                true,
                Dirty::Watched,
                sampled,
            ),
            // Linux 7.3+: RWP wherever the uffd has it, on every backing.
            (
                "rwp anonymous",
                input(rwp, Anonymous),
                true,
                Dirty::SoftDirty,
                Rwp { sync: false },
            ),
            (
                "rwp shmem, no memfd passed, VMM dropped its uffd (RWP needs neither)",
                PlanInput {
                    have_memory_fd: false,
                    vmm_holds_uffd: false,
                    ..input(rwp | feature::MISSING_SHMEM, Shmem)
                },
                true,
                Dirty::SoftDirty,
                Rwp { sync: false },
            ),
            (
                "rwp shmem without MISSING_SHMEM",
                input(rwp, Shmem),
                false,
                Dirty::SoftDirty,
                Rwp { sync: false },
            ),
            (
                "rwp hugetlb, sync",
                PlanInput {
                    rwp: RwpMode::Sync,
                    ..input(rwp | feature::MISSING_HUGETLBFS, Hugetlb)
                },
                true,
                Dirty::None,
                Rwp { sync: true },
            ),
            (
                "rwp off by configuration",
                PlanInput {
                    rwp: RwpMode::Off,
                    ..input(rwp | feature::WP_ASYNC, Anonymous)
                },
                true,
                Dirty::WpAsync,
                None,
            ),
            (
                "rwp with access off",
                PlanInput {
                    access_mode: AccessMode::Off,
                    ..input(rwp | feature::WP_ASYNC, Anonymous)
                },
                true,
                Dirty::WpAsync,
                None,
            ),
            (
                "firecracker uffd on an RWP kernel",
                PlanInput {
                    offered: 0x7ffff,
                    ..input(fc, Anonymous)
                },
                true,
                Dirty::SoftDirty,
                None,
            ),
            // Sync write-protect makes a dead agent stop the guest: only
            // when asked for.
            (
                "firecracker uffd, sync write-protect asked for",
                PlanInput {
                    sync_write_protect: true,
                    ..input(fc, Anonymous)
                },
                true,
                Dirty::WpSync,
                None,
            ),
            (
                "firecracker uffd, no soft-dirty bits in the kernel",
                PlanInput {
                    soft_dirty: false,
                    ..input(fc, Anonymous)
                },
                true,
                Dirty::None,
                None,
            ),
            (
                "firecracker uffd on hugetlbfs (no soft-dirty bits there)",
                PlanInput {
                    have_memory_fd: false,
                    missing_registered: true,
                    ..input(fc, Hugetlb)
                },
                true,
                Dirty::None,
                None,
            ),
        ];
        for (name, inp, first_touch, dirty, access) in cases {
            let p = plan(inp);
            assert_eq!(
                (p.first_touch, p.dirty, p.access),
                (first_touch, dirty, access),
                "{name}: {:?}",
                p.notes
            );
            assert_eq!(p.register_mode & mode::MISSING != 0, first_touch, "{name}");
            // A VMA is write-tracked or access-tracked, never both, and
            // write-protect is registered only where a method uses it.
            let rwp_access = matches!(access, Rwp { .. });
            assert_eq!(p.register_mode & mode::RWP != 0, rwp_access, "{name}");
            let uses_wp = matches!(dirty, Dirty::WpAsync | Dirty::WpSync | Dirty::Watched);
            assert_eq!(p.register_mode & mode::WP != 0, uses_wp, "{name}");
        }
    }

    #[test]
    fn methods_name_what_is_in_force() {
        let p = plan(input(feature::MISSING_SHMEM, BackingKind::Shmem));
        assert_eq!(p.methods(), vec![Method::FirstTouch, Method::ShmemSampled]);
        let p = plan(input(feature::WP_ASYNC, BackingKind::Anonymous));
        assert_eq!(
            p.methods().iter().map(|m| m.name()).collect::<Vec<_>>(),
            ["first_touch", "wp_async"]
        );
    }

    #[test]
    fn refusals_say_why() {
        let p = plan(PlanInput {
            vmm_holds_uffd: false,
            ..input(feature::MISSING_SHMEM, BackingKind::Shmem)
        });
        assert!(
            p.notes.iter().any(|n| n.contains("own copy of the uffd")),
            "{:?}",
            p.notes
        );
        let p = plan(input(feature::EVENT_REMOVE, BackingKind::Anonymous));
        assert!(p.notes.iter().any(|n| n.contains("memfd")), "{:?}", p.notes);
        let p = plan(PlanInput {
            offered: 0x7ffff,
            ..input(feature::EVENT_REMOVE, BackingKind::Anonymous)
        });
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("without UFFD_FEATURE_RWP")),
            "{:?}",
            p.notes
        );
        let p = plan(input(
            feature::MISSING_SHMEM | feature::WP_ASYNC,
            BackingKind::Shmem,
        ));
        assert!(
            p.notes.iter().any(|n| n.contains("cannot be frozen")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn recommended_features_are_offered_ones() {
        let offered = 0x1ffff;
        let r = recommended_features(offered, BackingKind::Shmem);
        assert_eq!(r & !offered, 0);
        assert!(r & feature::MISSING_SHMEM != 0);
        assert_eq!(recommended_features(0, BackingKind::Anonymous), 0);
        let r = recommended_features(0x7ffff, BackingKind::Anonymous);
        assert_eq!(
            r & (feature::RWP | feature::RWP_ASYNC),
            feature::RWP | feature::RWP_ASYNC
        );
        assert_eq!(r & feature::WP_ASYNC, 0, "no write-protect beside RWP");
    }
}
