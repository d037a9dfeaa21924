//! `wset-guest`: a test VMM. It maps guest memory, hands its userfaultfd to a
//! wset agent through Firecracker's or wset's handshake, and runs a scripted
//! access pattern in a real KVM guest or in this process, printing one JSON
//! event per line on stdout (registered, phase, verify, done).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use serde_json::json;
use wset_guest::kvm::{self, GuestOp, KvmGuest};
use wset_guest::memory::{BackingArg, Expected, GuestMemory, PAGE, written_word};
use wset_guest::script::{Op, Script};
use wset_guest::vmm::{self, HandshakeArg};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// A real KVM guest (needs /dev/kvm).
    Kvm,
    /// The same pattern run from a thread of this process.
    Process,
}

#[derive(Debug, Parser)]
#[command(
    name = "wset-guest",
    about = "A test VMM with a known memory access pattern"
)]
struct Args {
    /// The agent's socket.
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, value_enum, default_value = "kvm")]
    kind: Kind,
    #[arg(long, value_enum, default_value = "memfd")]
    backing: BackingArg,
    #[arg(long, value_enum, default_value = "wset")]
    handshake: HandshakeArg,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    #[arg(long, default_value = "guest")]
    vm_id: String,
    /// Labels as JSON, e.g. '{"tier":"gold"}'.
    #[arg(long, default_value = "{}")]
    labels: String,
    /// The access script (JSON, see wset_guest::script::Script).
    #[arg(long)]
    script: String,
    /// Fill data pages with a known pattern before registering, and verify
    /// checksums against it.
    #[arg(long)]
    fill_seed: Option<u32>,
    /// Firecracker snapshot restore: write guest memory (program and fill)
    /// to this file instead of memory; the agent serves faults from it.
    #[arg(long)]
    snapshot: Option<PathBuf>,
    /// Seed of the values written by write ops.
    #[arg(long, default_value_t = 0x5EED)]
    write_seed: u32,
    /// After the script, wait until stdin closes before exiting.
    #[arg(long)]
    wait_stdin: bool,
    /// Close the VMM's own copy of the uffd once the agent has it, so the
    /// agent holds the only one (as a VMM that hands its uffd off does).
    #[arg(long)]
    drop_uffd: bool,
}

/// Wall-clock time, so a test can order the guest's events against its own.
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn emit(v: serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        emit(json!({"event": "error", "message": format!("{e:#}")}));
        eprintln!("wset-guest: error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs touches in a KVM guest or in this process.
enum Engine {
    Kvm(Box<KvmGuest>),
    Process,
}

impl Engine {
    fn touch(
        &mut self,
        mem: &GuestMemory,
        op: Op,
        start: u32,
        pages: u32,
        seed: u32,
    ) -> anyhow::Result<()> {
        let write = match op {
            // Dropping pages is the VMM's act, whatever runs the guest.
            Op::Discard => return Ok(mem.discard(start, start + pages)?),
            Op::Unmap => return Ok(mem.unmap(start, start + pages)?),
            Op::Read => false,
            Op::Write => true,
        };
        match self {
            Engine::Kvm(g) => {
                let gop = if write { GuestOp::Write } else { GuestOp::Read };
                g.command(mem, gop, start, pages, PAGE as u32, seed)?;
            }
            Engine::Process => {
                for p in start..start + pages {
                    if write {
                        mem.write_u32(p as u64 * PAGE, written_word(seed, p));
                    } else {
                        std::hint::black_box(mem.read_u32(p as u64 * PAGE));
                    }
                }
            }
        }
        Ok(())
    }

    /// The stride of in-guest checksums: 16 dwords per page. KVM here may
    /// emulate every guest instruction (PVM), so a full checksum in the
    /// guest is too slow; the full check runs through the VMM's mapping.
    const STRIDE: u64 = 256;

    fn checksum(&mut self, mem: &GuestMemory, from: u32, to: u32) -> anyhow::Result<u32> {
        let per_page = (PAGE / Self::STRIDE) as u32;
        match self {
            Engine::Kvm(g) => Ok(g.command(
                mem,
                GuestOp::Checksum,
                from,
                (to - from) * per_page,
                Self::STRIDE as u32,
                0,
            )?),
            Engine::Process => Ok(mem.checksum(from, to, Self::STRIDE)),
        }
    }
}

/// Compare every dword of the data pages with what they should hold, through
/// the VMM's mapping of guest memory (the same pages the guest sees).
fn full_verify(
    mem: &GuestMemory,
    expected: &Expected,
    first: u32,
    pages: u32,
    checks: u64,
    mismatches: u64,
) -> serde_json::Value {
    let mut bad_words = 0u64;
    let mut first_bad = None;
    for w in (first as u64 * PAGE / 4)..(pages as u64 * PAGE / 4) {
        if mem.read_u32(w * 4) != expected.word(w) {
            bad_words += 1;
            first_bad.get_or_insert(w * 4);
        }
    }
    json!({
        "event": "verify",
        "ok": mismatches == 0 && bad_words == 0,
        "checks": checks,
        "mismatches": mismatches,
        "bad_words": bad_words,
        "first_bad_offset": first_bad,
    })
}

fn run(a: Args) -> anyhow::Result<()> {
    let script: Script =
        serde_json::from_str(&a.script).context("--script is not a valid script")?;
    let len = (a.mem_mib << 20) as usize;
    if !(len as u64).is_multiple_of(a.backing.page_size()) {
        bail!(
            "--mem-mib {} is not a multiple of the {} byte page size",
            a.mem_mib,
            a.backing.page_size()
        );
    }
    let mem = GuestMemory::new(a.backing, len).context("map guest memory")?;
    let pages = mem.pages();
    if script.extent() > pages {
        bail!(
            "the script touches page {} but the guest has {pages} pages",
            script.extent() - 1
        );
    }
    let first = kvm::FIRST_DATA_PAGE;
    let mut expected = Expected {
        fill_seed: a.fill_seed,
        ..Default::default()
    };

    // Contents before registration: in memory, or in the snapshot file.
    match &a.snapshot {
        Some(path) => {
            let image = GuestMemory::new(BackingArg::Anon, len)?;
            if a.kind == Kind::Kvm {
                kvm::install_program(&image);
            }
            if let Some(seed) = a.fill_seed {
                image.fill(seed, first, pages);
            }
            // Page by page through the safe accessors.
            let mut f = std::fs::File::create(path)
                .with_context(|| format!("create {}", path.display()))?;
            let mut buf = vec![0u8; PAGE as usize];
            for p in 0..pages {
                for (i, chunk) in buf.chunks_exact_mut(4).enumerate() {
                    chunk.copy_from_slice(
                        &image.read_u32(p as u64 * PAGE + i as u64 * 4).to_le_bytes(),
                    );
                }
                f.write_all(&buf)?;
            }
            f.sync_all()?;
        }
        None => {
            if a.kind == Kind::Kvm {
                kvm::install_program(&mem);
            }
            if let Some(seed) = a.fill_seed {
                mem.fill(seed, first, pages);
            }
        }
    }

    // Hand the uffd to the agent.
    let (uffd, reply, _fc_stream) = match a.handshake {
        HandshakeArg::Firecracker => {
            let u = vmm::firecracker_uffd(&mem).context("create Firecracker-style uffd")?;
            let s =
                vmm::firecracker_handshake(&a.socket, &mem, &u).context("Firecracker handshake")?;
            (Some(u), json!({"ok": true, "vm_id": null}), Some(s))
        }
        HandshakeArg::Wset => {
            let u = vmm::wset_uffd(&a.socket, a.backing)
                .context("create uffd with the agent's recommended features")?;
            let labels: serde_json::Value =
                serde_json::from_str(&a.labels).context("--labels is not JSON")?;
            let r = vmm::wset_register(&a.socket, &a.vm_id, labels, &mem, a.backing, &u)
                .context("wset handshake")?;
            if r["ok"] != json!(true) {
                bail!("the agent refused registration: {}", r["error"]);
            }
            (Some(u), r, None)
        }
        HandshakeArg::None => (
            None,
            json!({"ok": true, "vm_id": null, "untracked": true}),
            None,
        ),
    };
    let uffd = if a.drop_uffd {
        drop(uffd);
        None
    } else {
        uffd
    };
    let mut engine = match a.kind {
        Kind::Kvm => Engine::Kvm(Box::new(KvmGuest::new(&mem)?)),
        Kind::Process => Engine::Process,
    };
    let overhead: Vec<u32> = if a.kind == Kind::Kvm {
        kvm::OVERHEAD_PAGES.to_vec()
    } else {
        vec![]
    };
    emit(json!({
        "event": "registered",
        "pid": std::process::id(),
        "vm_id": reply["vm_id"],
        "reply": reply,
        "pages": pages,
        "overhead_pages": overhead,
        "addr": mem.addr(),
    }));

    // Each line on stdin asks for a full verification; EOF ends the guest
    // once its script is done.
    let (verify_tx, verify_rx) = std::sync::mpsc::channel::<()>();
    if a.wait_stdin {
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for _ in stdin.lock().lines().map_while(Result::ok) {
                if verify_tx.send(()).is_err() {
                    break;
                }
            }
        });
    } else {
        // Nobody will ask: close the channel so the end of the script ends the guest.
        drop(verify_tx);
    }
    let start = Instant::now();
    let mut periods_total = 0u64;
    let mut mismatches = 0u64;
    let mut checks = 0u64;
    for (i, phase) in script.phases.iter().enumerate() {
        emit(
            json!({"event": "phase", "index": i, "name": phase.name, "elapsed_ms": start.elapsed().as_millis() as u64, "unix_ms": unix_ms()}),
        );
        let end = Instant::now() + Duration::from_millis(phase.duration_ms);
        let mut period = 0u32;
        while Instant::now() < end {
            let t0 = Instant::now();
            for t in &phase.touches {
                engine.touch(&mem, t.op, t.start, t.pages, a.write_seed)?;
                match t.op {
                    Op::Write => {
                        for p in t.start..t.start + t.pages {
                            expected.overrides.insert(p, written_word(a.write_seed, p));
                        }
                    }
                    // MADV_DONTNEED zeroes private memory; shared memory keeps
                    // its contents in the file.
                    Op::Discard if matches!(a.backing, BackingArg::Anon | BackingArg::Thp) => {
                        for p in t.start..t.start + t.pages {
                            expected.overrides.remove(&p);
                            expected.zeroed.insert(p);
                        }
                    }
                    _ => {}
                }
            }
            period += 1;
            periods_total += 1;
            while verify_rx.try_recv().is_ok() {
                emit(full_verify(
                    &mem, &expected, first, pages, checks, mismatches,
                ));
            }
            if script.checksum_every > 0 && period.is_multiple_of(script.checksum_every) {
                checks += 1;
                if engine.checksum(&mem, first, pages)?
                    != expected.checksum(first, pages, Engine::STRIDE)
                {
                    mismatches += 1;
                }
            }
            let spent = t0.elapsed();
            let p = Duration::from_millis(phase.period_ms);
            if spent < p {
                std::thread::sleep((p - spent).min(end.saturating_duration_since(Instant::now())));
            }
        }
    }
    if a.fill_seed.is_some() || script.checksum_every > 0 {
        emit(full_verify(
            &mem, &expected, first, pages, checks, mismatches,
        ));
    }
    let exits = match &engine {
        Engine::Kvm(g) => g.exits,
        Engine::Process => 0,
    };
    emit(
        json!({"event": "done", "elapsed_ms": start.elapsed().as_millis() as u64, "vcpu_exits": exits, "periods": periods_total}),
    );
    // A "verify" line on stdin asks for a fresh full check (e.g. after the
    // agent stopped); EOF ends the guest.
    while verify_rx.recv().is_ok() {
        emit(full_verify(
            &mem, &expected, first, pages, checks, mismatches,
        ));
    }
    drop(uffd);
    Ok(())
}
