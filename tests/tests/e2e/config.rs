//! The real binaries' configuration: every flag also reads a variable under
//! the binary's prefix (`WSET_AGENT_*`, `WSET_CONTROLLER_*`), the previous
//! release's spellings (flags and variables) still work with a warning
//! naming the new one, and bad values are refused naming the flag.

use std::process::{Command, Stdio};
use std::time::Duration;

use wset_tests::harness::{Agent, AgentOpts, Controller, TempDir, bin, wait_for};

fn refused(mut cmd: Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run");
    assert!(!out.status.success(), "{cmd:?} started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn has(log: &[String], needle: &str) -> bool {
    log.iter().any(|l| l.contains(needle))
}

#[test]
fn the_agent_takes_old_spellings_with_a_warning() {
    let agent = Agent::start(AgentOpts {
        extra: vec!["--spin-us".into(), "50".into()],
        env: vec![("WSET_HOST_NAME".into(), "old-name".into())],
        ..Default::default()
    });
    agent.wait_log("host_id=old-name", Duration::from_secs(10));
    agent.wait_log(
        "--spin-us is deprecated and goes away in the next release: write --spin 50us",
        Duration::from_secs(10),
    );
    agent.wait_log(
        "WSET_HOST_NAME is deprecated and goes away in the next release: set WSET_AGENT_HOST_NAME",
        Duration::from_secs(10),
    );
    // The new variable wins over the old one.
    let agent = Agent::start(AgentOpts {
        env: vec![
            ("WSET_HOST_NAME".into(), "old-name".into()),
            ("WSET_AGENT_HOST_NAME".into(), "new-name".into()),
        ],
        ..Default::default()
    });
    agent.wait_log("host_id=new-name", Duration::from_secs(10));
    agent.wait_log(
        "WSET_HOST_NAME is deprecated and ignored: WSET_AGENT_HOST_NAME is set",
        Duration::from_secs(10),
    );
}

#[test]
fn the_controller_takes_its_variables_and_old_spellings() {
    let dir = TempDir::new("ctl-config");
    let mut cmd = Command::new(bin("wset-controller"));
    cmd.args(Controller::args(
        &dir.0.join("old"),
        &[],
        &["--tls-reload-secs", "5"],
    ))
    .env("WSET_AGENTS", "127.0.0.1:1");
    let ctl = Controller::spawn(cmd);
    let endpoints =
        |c: &Controller| -> Vec<String> { c.agents().into_iter().map(|a| a.endpoint).collect() };
    assert_eq!(endpoints(&ctl), ["127.0.0.1:1"]);
    wait_for(Duration::from_secs(10), "the deprecation warnings", || {
        let log = ctl.log();
        (has(&log, "--tls-reload-secs is deprecated and goes away in the next release: write --tls-reload 5s")
            && has(&log, "WSET_AGENTS is deprecated and goes away in the next release: set WSET_CONTROLLER_AGENTS"))
        .then_some(())
    });
    drop(ctl);

    let mut cmd = Command::new(bin("wset-controller"));
    cmd.args(Controller::args(&dir.0.join("new"), &[], &[]))
        .env("WSET_CONTROLLER_AGENTS", "127.0.0.1:2");
    let ctl = Controller::spawn(cmd);
    assert_eq!(endpoints(&ctl), ["127.0.0.1:2"]);
    assert!(!has(&ctl.log(), "deprecated"), "{:?}", ctl.log());
}

#[test]
fn bad_values_are_refused_naming_the_flag() {
    let dir = TempDir::new("bad-config");
    // (Controller::args already gives --sample-interval and --flush-interval.)
    for (extra, want) in [
        (
            &["--maintain-interval", "10ms"][..],
            "'--maintain-interval <DURATION>': 10ms is out of range: at least 100ms",
        ),
        (
            &["--dns-refresh", "300"],
            "'--dns-refresh <DURATION>': \"300\" has no unit",
        ),
        (
            &["--consolidate-below", "0.9"],
            "--consolidate-below: 0.9 must be below --high-watermark (0.85)",
        ),
    ] {
        let mut cmd = Command::new(bin("wset-controller"));
        cmd.args(Controller::args(&dir.0, &[], extra));
        let err = refused(cmd);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let mut cmd = Command::new(bin("wset-agent"));
    cmd.args(["--interval", "5ms"])
        .env("WSET_AGENT_STATE_DIR", dir.0.join("state"));
    let err = refused(cmd);
    assert!(
        err.contains("'--interval <DURATION>': 5ms is out of range: at least 10ms"),
        "{err}"
    );
    let mut cmd = Command::new(bin("wset-agent"));
    cmd.env("WSET_AGENT_MAX_STREAMS", "0");
    let err = refused(cmd);
    assert!(err.contains("--max-streams"), "{err}");
    // A snapshot memory file is checked at start-up, not at the first
    // restore: missing, a directory, unreadable.
    let sock = dir.0.join("vm.sock");
    let missing = dir.0.join("no-such.mem");
    let unreadable = dir.0.join("locked.mem");
    std::fs::write(&unreadable, [0u8; 4096]).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&unreadable, std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    // Root reads a file whatever its mode, so the unreadable case runs the
    // agent as nobody (setpriv, util-linux); the check is the agent's open.
    for (file, want, as_nobody) in [
        (&missing, "the snapshot memory file does not exist", false),
        (&dir.0, "is not a regular file (it is a directory)", false),
        (&unreadable, "Permission denied", true),
    ] {
        let mut cmd = if as_nobody {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
                .arg(bin("wset-agent"));
            c
        } else {
            Command::new(bin("wset-agent"))
        };
        let arg = format!("{}={}", sock.display(), file.display());
        cmd.arg("--socket")
            .arg(&arg)
            .env("WSET_AGENT_STATE_DIR", dir.0.join("state"));
        let err = refused(cmd);
        assert!(
            err.contains(&format!("--socket: {arg}: ")) && err.contains(want),
            "{file:?}: {err}"
        );
    }
}
