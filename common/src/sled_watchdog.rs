//! Noticing that sled has stopped: a guard against a deadlock in sled
//! 0.34's IO thread pool.
//!
//! sled writes its sealed log buffers on a pool of 7 threads. When the tail
//! of the log file is freed, it queues the file's truncation on the same
//! pool; the next writer that needs a fresh segment waits for that
//! truncation while holding the segment accountant's lock, and every
//! buffer write in flight needs that lock to finish. When those writes
//! occupy all 7 threads, the truncation waits behind them for good, and so
//! does every later write (sled issue #1412). The pool is meant to grow
//! when tasks queue up, but its count of idle threads goes below zero
//! while all of them work, so it never does. afsd hit this under the
//! benchmark: every request that touched the database hung, forever.
//!
//! Nothing outside sled can unblock it. The watchdog notices it (a probe
//! write every half second that does not return) and tells its owner,
//! which can then restart the process: everything durable is in sled and
//! the export, and recovery at startup is built for exactly this.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the probe writes.
const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Runs until dropped. The probe thread is not waited for (it may be
/// stuck in sled for good): it ends at its next wake-up, and holds the
/// database open until then.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    /// Tests: the probe behaves as if its write never returned.
    stuck: Arc<AtomicBool>,
    probe: std::thread::Thread,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `db` (the probe writes to a small tree of its own).
    /// `on_stall` runs on the watchdog's thread, every half second while a
    /// probe write has been stuck for `after` or longer, with how long.
    pub fn start(
        db: &sled::Db,
        after: Duration,
        on_stall: impl Fn(Duration) + Send + 'static,
    ) -> std::io::Result<Watchdog> {
        let tree = db.open_tree("watchdog").map_err(std::io::Error::other)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stuck = Arc::new(AtomicBool::new(false));
        let epoch = Instant::now();
        // When (ms since `epoch`, at least 1) the running probe started; 0
        // while none runs.
        let probing = Arc::new(AtomicU64::new(0));
        let probe = {
            let (stop, stuck, probing) = (stop.clone(), stuck.clone(), probing.clone());
            std::thread::Builder::new().name("sled-probe".into()).spawn(move || {
                let mut n: u64 = 0;
                while !stop.load(Ordering::Relaxed) {
                    probing.store((epoch.elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
                    while stuck.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                        std::thread::park_timeout(PROBE_EVERY);
                    }
                    n += 1;
                    let _ = tree.insert(b"probe", &n.to_be_bytes());
                    probing.store(0, Ordering::SeqCst);
                    std::thread::park_timeout(PROBE_EVERY);
                }
            })?
        };
        let watcher = {
            let stop = stop.clone();
            std::thread::Builder::new().name("sled-watchdog".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(PROBE_EVERY);
                    let started = probing.load(Ordering::SeqCst);
                    let stuck_for = Duration::from_millis((epoch.elapsed().as_millis() as u64).saturating_sub(started));
                    if started != 0 && stuck_for >= after && !stop.load(Ordering::Relaxed) {
                        on_stall(stuck_for);
                    }
                }
            })?
        };
        Ok(Watchdog { stop, stuck, probe: probe.thread().clone(), watcher: Some(watcher) })
    }

    /// Tests: from now on the probe acts as if sled had stopped.
    pub fn simulate_stall(&self) {
        self.stuck.store(true, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.probe.unpark();
        if let Some(w) = self.watcher.take() {
            w.thread().unpark();
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn temp_db() -> sled::Db {
        sled::Config::new().temporary(true).open().unwrap()
    }

    #[test]
    fn a_healthy_database_raises_no_alarm() {
        let db = temp_db();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let dog = Watchdog::start(&db, Duration::from_millis(600), move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(2000));
        drop(dog);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert!(db.open_tree("watchdog").unwrap().get(b"probe").unwrap().is_some(), "the probe writes");
    }

    #[test]
    fn a_stuck_write_is_reported_with_how_long() {
        let db = temp_db();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let dog = Watchdog::start(&db, Duration::from_millis(600), move |stuck| s.lock().unwrap().push(stuck)).unwrap();
        dog.simulate_stall();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(dog);
        let seen = seen.lock().unwrap();
        assert!(seen.len() >= 2, "reported every half second while stuck: {seen:?}");
        assert!(seen.iter().all(|d| *d >= Duration::from_millis(600)), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[1] > w[0]), "the stall grows: {seen:?}");
    }
}
