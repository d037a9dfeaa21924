//! `wset-agent`: the per-host agent. Its flags and their `WSET_AGENT_*`
//! environment variables ([`wset_agent::config::Args`]) map onto
//! [`wset_agent::Config`]; every flag has an embedded default.

fn main() -> std::process::ExitCode {
    use wset_serve::process;
    let startup = wset_serve::cli::parse::<wset_agent::config::Args>(std::env::args_os())
        .unwrap_or_else(|e| e.exit());
    let result = process::run("wset-agent", startup.log_json, async move {
        startup.warn_deprecated();
        wset_agent::run(startup.config, process::shutdown_signal()).await?;
        Ok(())
    });
    process::exit("wset-agent", result)
}
