//! Who gets in: a token bucket and a cap on handshakes in progress shared
//! by every socket, and the cgroup allow-list. A flood is refused before
//! its handshake is read.

use std::sync::Arc;

/// Why a registration was refused at the door.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    #[error("too many handshakes in progress; try again shortly")]
    Busy,
    #[error("registration rate limit ({rate}/s, burst {burst}) reached; try again shortly")]
    RateLimit { rate: f64, burst: f64 },
}

/// How many registrations are admitted: a token bucket (rate and burst)
/// shared by every socket, and a cap on handshakes in progress. A flood is
/// refused at the door, before its handshake is read, so registered VMs
/// (served by their own threads) and well-behaved peers are unaffected.
#[derive(Debug)]
pub struct Admission {
    bucket: std::sync::Mutex<(f64, std::time::Instant)>,
    rate: f64,
    burst: f64,
    pending: Arc<tokio::sync::Semaphore>,
    /// Refusals are logged at most 20 a second; the next line counts the rest.
    pub(super) log: wset_serve::LogThrottle,
}

impl Admission {
    pub fn new(rate_per_s: f64, burst: u32, max_pending: usize) -> Self {
        Self {
            bucket: std::sync::Mutex::new((f64::from(burst), std::time::Instant::now())),
            rate: rate_per_s,
            burst: f64::from(burst),
            pending: Arc::new(tokio::sync::Semaphore::new(max_pending)),
            log: wset_serve::LogThrottle::new(20),
        }
    }

    /// Take one token, or say why not.
    pub(super) fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refused> {
        let permit = self
            .pending
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Busy)?;
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * self.rate).min(self.burst);
        b.1 = now;
        if b.0 < 1.0 {
            return Err(Refused::RateLimit {
                rate: self.rate,
                burst: self.burst,
            });
        }
        b.0 -= 1.0;
        Ok(permit)
    }
}

/// The cgroups `pid` belongs to (every hierarchy's path).
pub(super) fn cgroups_of(pid: libc::pid_t) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2).map(str::to_owned))
        .collect()
}

/// Whether any of `cgroups` is `prefix` or below it.
pub(super) fn cgroup_allowed(cgroups: &[String], allowed: &[String]) -> bool {
    allowed.is_empty()
        || cgroups.iter().any(|c| {
            allowed.iter().any(|a| {
                let a = a.trim_end_matches('/');
                a.is_empty()
                    || c == a
                    || c.strip_prefix(a).is_some_and(|rest| rest.starts_with('/'))
            })
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn cgroup_allow_list_matches_whole_path_components() {
        let cg = vec!["/kubepods.slice/pod-a/vmm".to_owned(), "/".to_owned()];
        let allow =
            |a: &[&str]| cgroup_allowed(&cg, &a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(allow(&[]));
        assert!(allow(&["/kubepods.slice"]));
        assert!(allow(&["/kubepods.slice/"]));
        assert!(allow(&["/kubepods.slice/pod-a/vmm"]));
        assert!(!allow(&["/kubepods"]));
        assert!(!allow(&["/system.slice", "/kubepods.slice/pod-b"]));
    }

    #[test]
    fn admission_refuses_past_the_burst_and_refills() {
        let a = Admission::new(1000.0, 3, 100);
        let held: Vec<_> = (0..3)
            .map(|_| a.admit().expect("within the burst"))
            .collect();
        assert_eq!(
            a.admit().unwrap_err(),
            Refused::RateLimit {
                rate: 1000.0,
                burst: 3.0
            }
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(a.admit().is_ok());
        drop(held);
        let b = Admission::new(1000.0, 10, 1);
        let _one = b.admit().unwrap();
        assert_eq!(b.admit().unwrap_err(), Refused::Busy);
    }
}
