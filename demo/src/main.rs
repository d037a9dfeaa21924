//! `wset-demo`: the main job on one machine. Starts the real agent and the
//! real controller with their embedded defaults and several real KVM guests
//! (process guests where /dev/kvm is missing) with known, different working
//! sets, one of which changes phase, and shows a live table of what the
//! agent measures next to the truth, and what the controller has collected.
//! Ctrl-C stops everything cleanly.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use wset_guest::script::{Op, Phase, Script, Touch};
use wset_proto::v1 as pb;
use wset_proto::v1::agent_service_client::AgentServiceClient;
use wset_proto::v1::controller_service_client::ControllerServiceClient;
use wset_proto::v1::scheduler_service_client::SchedulerServiceClient;

const GRPC: &str = "127.0.0.1:7070";
const CONTROLLER: &str = "127.0.0.1:7071";
const SOCKET: &str = "/run/wset/agent.sock";

struct DemoGuest {
    vm_id: &'static str,
    backing: &'static str,
    mem_mib: u64,
    script: Script,
    /// Pages the guest touches in phase i (plus its program pages).
    truth: Vec<(&'static str, u64)>,
}

fn touch(op: Op, start: u32, pages: u32) -> Touch {
    Touch { op, start, pages }
}

fn phase(name: &str, touches: Vec<Touch>, secs: u64) -> Phase {
    Phase {
        name: name.into(),
        touches,
        duration_ms: secs * 1000,
        period_ms: 200,
    }
}

fn guests() -> Vec<DemoGuest> {
    vec![
        DemoGuest {
            vm_id: "web",
            backing: "memfd",
            mem_mib: 128,
            script: Script {
                phases: vec![phase(
                    "steady",
                    vec![touch(Op::Read, 16, 6000), touch(Op::Write, 8000, 1500)],
                    3600,
                )],
                checksum_every: 0,
            },
            truth: vec![("steady", 7500)],
        },
        DemoGuest {
            vm_id: "batch",
            backing: "memfd",
            mem_mib: 128,
            script: Script {
                phases: vec![
                    phase("small", vec![touch(Op::Read, 16, 2000)], 40),
                    phase(
                        "grown",
                        vec![touch(Op::Read, 16, 2000), touch(Op::Write, 4000, 12000)],
                        40,
                    ),
                    phase("small", vec![touch(Op::Read, 16, 2000)], 3600),
                ],
                checksum_every: 0,
            },
            truth: vec![("small", 2000), ("grown", 14000), ("small", 2000)],
        },
        DemoGuest {
            vm_id: "idle",
            backing: "anon",
            mem_mib: 64,
            script: Script {
                phases: vec![phase("idle", vec![touch(Op::Write, 16, 100)], 3600)],
                checksum_every: 0,
            },
            truth: vec![("idle", 100)],
        },
    ]
}

fn bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_owned();
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found next to wset-demo: build the workspace binaries (cargo build --release --bins)",
            p.display()
        );
    }
    Ok(p)
}

/// A command whose process starts with no signal blocked: the demo blocks
/// SIGINT/SIGTERM for its own waiter thread, and a child would inherit that.
fn unblocked(mut cmd: Command) -> Command {
    // SAFETY: between fork and exec the closure only calls pthread_sigmask,
    // which is async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::sys::signal::SigSet::all().thread_unblock();
            Ok(())
        });
    }
    cmd
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1 << 20) as f64)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("wset-demo: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    // Block SIGINT/SIGTERM before any thread starts (threads inherit the
    // mask), and take them in one waiter thread that asks the loop to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGINT);
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.thread_block().context("block signals")?;
    {
        let s = stop.clone();
        std::thread::spawn(move || {
            let _ = set.wait();
            s.store(true, Ordering::SeqCst);
        });
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let kind = if kvm { "kvm" } else { "process" };
    println!(
        "wset demo: agent with embedded defaults + {} guests ({kind}); Ctrl-C to stop",
        guests().len()
    );
    if !kvm {
        println!(
            "  (/dev/kvm is not usable here: the guests run as process guests with the same patterns)"
        );
    }
    let mut agent = unblocked(Command::new(bin("wset-agent")?))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start wset-agent")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut client = None;
    let t0 = Instant::now();
    while client.is_none() {
        if let Ok(Some(st)) = agent.try_wait() {
            bail!("wset-agent exited at start ({st}); see its message above");
        }
        client = rt
            .block_on(AgentServiceClient::connect(format!("http://{GRPC}")))
            .ok();
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = agent.kill();
            bail!("wset-agent did not serve gRPC on {GRPC} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut client = client.expect("connected");
    // The controller, with its defaults: it subscribes to this agent and
    // keeps history in /var/lib/wset/controller.
    let mut controller = unblocked(Command::new(bin("wset-controller")?))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start wset-controller")?;
    let mut ctl = None;
    let t1 = Instant::now();
    while ctl.is_none() {
        if let Ok(Some(st)) = controller.try_wait() {
            let _ = agent.kill();
            bail!("wset-controller exited at start ({st}); see its message above");
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{CONTROLLER}"))?;
        ctl = rt.block_on(endpoint.connect()).ok();
        if t1.elapsed() > Duration::from_secs(20) {
            let _ = agent.kill();
            let _ = controller.kill();
            bail!("wset-controller did not serve gRPC on {CONTROLLER} within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let channel = ctl.expect("connected");
    let mut ctl = ControllerServiceClient::new(channel.clone());
    let sched = SchedulerServiceClient::new(channel);
    let mut children: Vec<(Child, DemoGuest, Instant)> = Vec::new();
    for g in guests() {
        let child = unblocked(Command::new(bin("wset-guest")?))
            .args([
                "--socket",
                SOCKET,
                "--kind",
                kind,
                "--backing",
                g.backing,
                "--vm-id",
                g.vm_id,
            ])
            .args(["--mem-mib", &g.mem_mib.to_string(), "--fill-seed", "1"])
            .arg("--script")
            .arg(serde_json::to_string(&g.script)?)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start wset-guest")?;
        children.push((child, g, Instant::now()));
    }
    let overhead = if kvm { 2 } else { 0 };
    println!("agent gRPC {GRPC}, controller gRPC {CONTROLLER}; try:");
    println!("  grpcurl -plaintext {GRPC} list");
    println!(
        "  grpcurl -plaintext -d '{{\"vm_id\":\"web\"}}' {GRPC} wset.v1.AgentService/GetSummary"
    );
    println!("  grpcurl -plaintext {CONTROLLER} wset.v1.ControllerService/ListAgents");
    println!(
        "  grpcurl -plaintext -d '{{\"vm_id\":\"web\",\"page_size\":5}}' {CONTROLLER} wset.v1.ControllerService/GetVmHistory\n"
    );
    let mut last = Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() < Duration::from_secs(2) {
            continue;
        }
        last = Instant::now();
        if let Ok(Some(st)) = agent.try_wait() {
            for (mut c, _, _) in children {
                let _ = c.kill();
                let _ = c.wait();
            }
            bail!("wset-agent exited ({st}); see its message above");
        }
        let mut out = String::new();
        out.push_str(&format!(
            "t={:>4}s  {:<6} {:>7} {:>22} {:>11} {:>11} {:>13}  {}\n",
            t0.elapsed().as_secs(),
            "vm",
            "mem MiB",
            "phase (true WS MiB)",
            "WS 10s MiB",
            "WS 1m MiB",
            "dirty MiB/s",
            "methods (error)"
        ));
        for (_, g, started) in &children {
            // Where the script is now (phases in order, by elapsed time).
            let mut at = started.elapsed().as_millis() as u64;
            let mut current = g.truth.last().copied().unwrap_or(("?", 0));
            for (i, p) in g.script.phases.iter().enumerate() {
                if at < p.duration_ms {
                    current = g.truth[i];
                    break;
                }
                at -= p.duration_ms;
            }
            let truth = (current.1 + overhead) * 4096;
            let summary = rt
                .block_on(client.get_summary(pb::GetSummaryRequest {
                    vm_id: g.vm_id.into(),
                }))
                .and_then(|r| {
                    r.into_inner().summary.ok_or_else(|| {
                        tonic::Status::internal("the agent answered without a summary")
                    })
                });
            match summary {
                Ok(s) => {
                    let ws = |ms: u64| {
                        s.windows
                            .iter()
                            .find(|w| w.window_ms == ms)
                            .map_or(0, |w| w.wss_bytes)
                    };
                    let methods: Vec<String> = s
                        .methods
                        .iter()
                        .filter_map(|&m| pb::TrackingMethod::try_from(m).ok())
                        .map(|m| {
                            m.as_str_name()
                                .trim_start_matches("TRACKING_METHOD_")
                                .to_lowercase()
                        })
                        .collect();
                    let err = s.error.as_ref().map_or(String::new(), |e| {
                        if e.wss_is_lower_bound {
                            "lower bound".into()
                        } else {
                            format!("±{:.1}% of mem", e.relative_error * 100.0)
                        }
                    });
                    out.push_str(&format!(
                        "        {:<6} {:>7} {:>22} {:>11} {:>11} {:>13.2}  {} ({err})\n",
                        g.vm_id,
                        g.mem_mib,
                        format!("{} ({})", current.0, mib(truth)),
                        mib(ws(10_000)),
                        mib(ws(60_000)),
                        s.dirty_rate_bytes_per_s / (1 << 20) as f64,
                        methods.join("+"),
                    ));
                }
                Err(e) => out.push_str(&format!(
                    "        {:<6} waiting: {}\n",
                    g.vm_id,
                    e.message()
                )),
            }
        }
        out.push_str(&controller_line(&rt, &mut ctl, &sched));
        println!("{out}");
        let _ = std::io::stdout().flush();
    }
    println!("stopping: guests first, then the agent (it puts every page back)");
    // Close our gRPC connection first so the agent has nothing to drain.
    drop(client);
    drop(ctl);
    drop(sched);
    drop(rt);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(controller.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let st = controller.wait()?;
    println!("controller exited: {st}");
    for (mut c, _, _) in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let st = agent.wait()?;
    println!("agent exited: {st}");
    Ok(())
}

/// What the controller has: its agent's stream and the history it keeps.
fn controller_line(
    rt: &tokio::runtime::Runtime,
    ctl: &mut ControllerServiceClient<tonic::transport::Channel>,
    sched: &SchedulerServiceClient<tonic::transport::Channel>,
) -> String {
    let agents = match rt.block_on(ctl.list_agents(pb::ListAgentsRequest {})) {
        Ok(a) => a.into_inner().agents,
        Err(e) => return format!("        controller: {}\n", e.message()),
    };
    let mut out = String::new();
    for a in agents {
        let state = pb::AgentConnectionState::try_from(a.state).map_or("?".to_owned(), |s| {
            s.as_str_name()
                .trim_start_matches("AGENT_CONNECTION_STATE_")
                .to_lowercase()
        });
        let points = rt
            .block_on(ctl.get_vm_history(pb::GetVmHistoryRequest {
                vm_id: "web".into(),
                page_size: 10_000,
                ..Default::default()
            }))
            .map_or(0, |h| h.into_inner().points.len());
        let durable_s = if a.durable_through_ms > 0 {
            format!(
                "newest batch on disk {:.1} s old",
                wset_serve::process::now_ms().saturating_sub(a.durable_through_ms) as f64 / 1000.0
            )
        } else {
            "nothing on disk yet".into()
        };
        out.push_str(&format!(
            "        controller: agent {} {state}, {} batches, {} summaries stored; web has {points} history points; {durable_s}{}\n",
            a.endpoint,
            a.batches_received,
            a.summaries_stored,
            if a.last_error.is_empty() { String::new() } else { format!(" (last error: {})", a.last_error) }
        ));
    }
    out.push_str(&plan_lines(rt, sched));
    out
}

/// The controller's current plan: each host's overcommit figures and the
/// recommended migrations.
fn plan_lines(
    rt: &tokio::runtime::Runtime,
    sched: &SchedulerServiceClient<tonic::transport::Channel>,
) -> String {
    let mut s = sched.clone();
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let mut out = String::new();
    if let Ok(o) = rt.block_on(s.get_overcommit(pb::GetOvercommitRequest::default())) {
        for h in o.into_inner().hosts {
            out.push_str(&format!(
                "        plan: host {}: demand at risk {:.2} GiB of {:.1} GiB for VMs, {:.1} GiB admissible, safe overcommit {:.1}x, {:.2} GiB reclaimable\n",
                h.host_id,
                gib(h.demand_at_risk_bytes),
                gib(h.capacity_bytes as f64),
                gib(h.admissible_bytes as f64),
                h.safe_overcommit_ratio,
                gib(h.reclaimable_bytes as f64),
            ));
        }
    }
    if let Ok(m) = rt.block_on(s.list_migrations(pb::ListMigrationsRequest::default())) {
        let m = m.into_inner();
        if m.migrations.is_empty() {
            out.push_str("        plan: no migration recommended\n");
        }
        for x in m.migrations {
            out.push_str(&format!(
                "        plan: move {} from {} to {}: {}\n",
                x.vm_id, x.from_host_id, x.to_host_id, x.explanation
            ));
        }
    }
    out
}
