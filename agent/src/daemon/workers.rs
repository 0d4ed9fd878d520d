//! The agent's threads: each runs under a guard that turns a panic into a log line, a count and
//! a notice to the event loop, which then stops the agent with an error rather than serve stale
//! figures; and each is joined with a deadline.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::outputs::metrics::{Metrics, labelled};

/// A worker thread and its stop flag.
pub struct Worker {
    pub name: &'static str,
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
    /// Wakes a worker that waits on something other than [`std::thread::park_timeout`].
    wake: Option<Box<dyn Fn() + Send + Sync>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Where a panicking worker says so.
pub type Panics = mpsc::UnboundedSender<&'static str>;

/// Starts `body` on a thread called `nw-<name>`, given its stop flag. A panic is logged,
/// counted in `nodewarden_worker_panics_total`, and sent to `panics`.
pub fn spawn(
    name: &'static str,
    metrics: &Metrics,
    panics: &Panics,
    body: impl FnOnce(&AtomicBool) + Send + 'static,
) -> std::io::Result<Worker> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (metrics, panics) = (metrics.clone(), panics.clone());
    let handle = std::thread::Builder::new()
        .name(format!("nw-{name}"))
        .spawn(move || {
            if std::panic::catch_unwind(AssertUnwindSafe(|| body(&flag))).is_err() {
                panicked(name, &metrics, &panics);
            }
        })?;
    Ok(Worker {
        name,
        stop,
        handle,
        wake: None,
    })
}

/// Watches an async task (an endpoint): its panic stops the agent as a worker's does. Returns
/// the watcher's handle, which ends with the task.
pub fn watch(
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
    metrics: &Metrics,
    panics: &Panics,
) -> tokio::task::JoinHandle<()> {
    let (metrics, panics) = (metrics.clone(), panics.clone());
    tokio::spawn(async move {
        if task.await.is_err_and(|e| e.is_panic()) {
            panicked(name, &metrics, &panics);
        }
    })
}

/// Says that `name` panicked: the log, the count, the event loop.
fn panicked(name: &'static str, metrics: &Metrics, panics: &Panics) {
    tracing::error!(worker = name, "panicked: stopping the agent");
    if let Some(c) = labelled(&metrics.worker_panics, &[name]) {
        c.inc();
    }
    let _ = panics.send(name);
}

impl Worker {
    /// `wake` is called when the worker is asked to stop: idle workers wait without a timeout
    /// that polls their flag (each poll a wake-up of an idle agent), so something must wake
    /// them.
    #[must_use]
    pub fn waking(mut self, wake: impl Fn() + Send + Sync + 'static) -> Self {
        self.wake = Some(Box::new(wake));
        self
    }

    /// Asks the worker to stop (it looks at its flag between units of work), and wakes it:
    /// from [`std::thread::park_timeout`], or by its waker.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        if let Some(wake) = &self.wake {
            wake();
        }
    }

    /// Waits until `deadline` for the worker to end; one still running is left behind (the
    /// process exit ends it) and said so.
    pub fn join(self, deadline: Instant) {
        while !self.handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.handle.is_finished() {
            let _ = self.handle.join();
        } else {
            tracing::warn!(
                worker = self.name,
                "worker still busy at shutdown: left behind"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::metrics::Shared;

    #[test]
    fn a_panicking_worker_is_logged_counted_and_reported() {
        let metrics = Metrics::new(Shared::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let w = spawn("test", &metrics, &tx, |_| panic!("a test panic")).expect("spawn");
        w.join(Instant::now() + Duration::from_secs(10));
        assert_eq!(rx.try_recv(), Ok("test"));
        assert_eq!(metrics.worker_panics.with_label_values(&["test"]).get(), 1);
    }

    /// Idle workers wait a minute at a time, without polling their flag: the stop wakes them
    /// (parked, or by their waker), so they end long before a join's deadline.
    #[test]
    fn a_stop_wakes_idle_workers() {
        let metrics = Metrics::new(Shared::default());
        let (tx, _rx) = mpsc::unbounded_channel();
        let ended = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let parked = {
            let ended = ended.clone();
            spawn("parked", &metrics, &tx, move |stop| {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::park_timeout(Duration::from_secs(60));
                }
                ended.fetch_add(1, Ordering::SeqCst);
            })
            .expect("spawn")
        };
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let waiting = {
            let ended = ended.clone();
            spawn("waiting", &metrics, &tx, move |stop| {
                while !stop.load(Ordering::Relaxed) {
                    let _ = woken.recv_timeout(Duration::from_secs(60));
                }
                ended.fetch_add(1, Ordering::SeqCst);
            })
            .expect("spawn")
            .waking(move || {
                let _ = wake.send(());
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        for w in [parked, waiting] {
            w.stop();
            w.join(Instant::now() + Duration::from_secs(30));
        }
        assert_eq!(ended.load(Ordering::SeqCst), 2, "both woke and ended");
    }

    #[test]
    fn workers_stop_when_asked_and_a_busy_one_is_left_behind() {
        let metrics = Metrics::new(Shared::default());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let polite = spawn("polite", &metrics, &tx, |stop| {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
            }
        })
        .expect("spawn");
        // Busy until released (or 60 s): a join that waited for it would see it finished.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let busy = spawn("busy", &metrics, &tx, move |_| {
            let _ = held.recv_timeout(Duration::from_secs(60));
            done.store(true, Ordering::SeqCst);
        })
        .expect("spawn");
        polite.stop();
        busy.stop();
        polite.join(Instant::now() + Duration::from_secs(60));
        busy.join(Instant::now() + Duration::from_millis(100));
        assert!(
            !finished.load(Ordering::SeqCst),
            "join returned only once the busy worker ended"
        );
        let _ = release.send(());
        assert!(rx.try_recv().is_err(), "no panic");
    }
}
