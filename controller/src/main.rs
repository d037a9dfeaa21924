//! `wset-controller`: collects every agent's summaries into a history in
//! sled and serves it. Its flags and their `WSET_CONTROLLER_*` environment
//! variables ([`wset_controller::config::Args`]) map onto
//! [`wset_controller::Config`]; every flag has an embedded default.

/// Malloc arenas kept at most, unless `MALLOC_ARENA_MAX` says otherwise.
const MALLOC_ARENAS: i32 = 2;

/// Keep glibc's malloc to [`MALLOC_ARENAS`] arenas. By default it opens up
/// to eight per core, one for each thread that contends, and memory freed
/// in one arena is not reused by another: under load (the ingest tasks,
/// the writer thread and the store's threads handing buffers to each
/// other) that fragmentation was most of the controller's growth
/// (BENCHMARKS.md). Small allocations still go through each thread's own
/// cache without a lock. Called before any thread starts.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt sets one of the allocator's tunables; no thread
        // runs yet.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) } != 1 {
            eprintln!("wset-controller: could not limit malloc to {MALLOC_ARENAS} arenas");
        }
    }
}

/// How often free heap pages are handed back to the kernel.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Hand the heap's free pages back to the kernel every [`TRIM_EVERY`].
/// glibc's malloc keeps what is freed inside its arenas and on its own
/// returns only a free stretch at the top of the main one; the store's
/// node buffers and the batches in flight come in every size, so under the
/// load test about 30% of the controller's resident memory was free heap
/// that glibc kept (BENCHMARKS.md). `malloc_trim` releases every free page
/// of every arena, walking each under its lock (2-7 ms a call under
/// the load test).
fn trim_heap_periodically() {
    #[cfg(target_env = "gnu")]
    {
        let spawned = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    let t = std::time::Instant::now();
                    // SAFETY: malloc_trim takes the arenas' own locks; no
                    // pointer is passed or kept.
                    unsafe { libc::malloc_trim(0) };
                    tracing::debug!(took = ?t.elapsed(), "free heap pages returned to the kernel");
                }
            });
        if let Err(e) = spawned {
            eprintln!("wset-controller: no heap-trim thread ({e}); free heap stays with malloc");
        }
    }
}

fn main() -> std::process::ExitCode {
    use wset_serve::process;
    limit_malloc_arenas();
    trim_heap_periodically();
    let startup = wset_serve::cli::parse::<wset_controller::config::Args>(std::env::args_os())
        .unwrap_or_else(|e| e.exit());
    let result = process::run("wset-controller", startup.log_json, async move {
        startup.warn_deprecated();
        wset_controller::run(startup.config, process::shutdown_signal()).await?;
        Ok(())
    });
    process::exit("wset-controller", result)
}
