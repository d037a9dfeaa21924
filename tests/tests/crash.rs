//! The agent is killed (SIGKILL) while it holds guest pages in custody. The
//! guest waits on those pages (its VMM holds the uffd) but loses nothing;
//! a restarted agent on the same state directory puts every page back and
//! the guest runs on with its memory complete, checked word by word.

use std::time::{Duration, Instant};

use wset_proto::v1 as pb;
use wset_tests::harness::{Agent, AgentOpts, Guest, GuestOpts, TempDir};
use wset_tests::script::{Op, Phase, Script, Touch};

#[test]
fn killed_agent_loses_no_page_and_a_restarted_one_puts_them_back() {
    let state = TempDir::new("crash-state");
    let opts = AgentOpts {
        access: "exhaustive".into(),
        state_dir: Some(state.0.clone()),
        ..Default::default()
    };
    let mut agent = Agent::start(opts.clone());
    // A long phase touching a small hot set, so most pages sit in custody.
    let p = Phase {
        name: "p".into(),
        touches: vec![
            Touch {
                op: Op::Read,
                start: 16,
                pages: 100,
            },
            Touch {
                op: Op::Write,
                start: 200,
                pages: 50,
            },
        ],
        duration_ms: 8000,
        period_ms: 50,
    };
    let mut o = GuestOpts::new(
        "crash",
        Script {
            phases: vec![p],
            checksum_every: 0,
        },
    );
    o.kind = "process";
    o.mem_mib = 16;
    o.fill_seed = Some(77);
    let mut g = Guest::start(&agent, o);
    let s = agent.wait_summary(
        "crash",
        Duration::from_secs(10),
        "most pages in custody",
        |s| {
            s.counters
                .as_ref()
                .is_some_and(|c| c.pages_in_custody > 3000)
        },
    );
    let held = s.counters.unwrap().pages_in_custody;
    agent.kill();
    let custody = state.0.join("custody/crash.custody");
    assert!(custody.exists(), "the custody file must outlive the agent");

    // The guest's script ends, then a full check touches every page: it
    // must wait (not read zeros) until a new agent is there.
    let t0 = Instant::now();
    let restarted = std::thread::scope(|sc| {
        let waiter = sc.spawn(|| {
            std::thread::sleep(Duration::from_secs(3));
            Agent::start(opts.clone())
        });
        let v = g.verify_now();
        (v, t0.elapsed(), waiter.join().unwrap())
    });
    let (v, waited, agent2) = restarted;
    eprintln!(
        "{held} pages in custody at the kill; the guest's full check waited {waited:?} and found {v}"
    );
    assert_eq!(v["ok"], true, "memory damaged across an agent kill: {v}");
    assert!(
        waited >= Duration::from_secs(3),
        "the guest read pages in custody without waiting ({waited:?})"
    );
    assert!(!custody.exists(), "custody file left after recovery");
    agent2.wait_log(
        "pages left by a previous agent put back",
        Duration::from_secs(5),
    );
    // The VM can register again with the new agent afterwards.
    assert!(
        agent2
            .list()
            .iter()
            .all(|vm| vm.state != pb::VmState::Tracking as i32)
    );
}
