//! The HTTP endpoint Prometheus scrapes, `GET /metrics`, and a kubelet probes: `GET /healthz`
//! (the event loop turns) and `GET /readyz` (and start-up is over; see [`super::health`]).
//!
//! Anyone who can reach the port can open connections, so each is bounded: a request head must
//! arrive within [`HEADER_READ_TIMEOUT`] (also the longest a kept-alive connection waits
//! idle), a connection lives at most [`MAX_CONNECTION_AGE`], and at most a quarter of the open
//! files limit are held at once. At that cap a new connection makes room by closing the oldest
//! one that has not sent a request, so a scrape is served while a client holds thousands open.
//! A failed accept (descriptors exhausted) backs off instead of retrying at once.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
};

use super::metrics::Metrics;

/// Longest a client may take to send a request head, counted from its connection or its
/// previous response: a scraper sends one at once, an idle or slow client is closed after it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest one connection stays open, however busy; a kept-alive scraper just reconnects.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// Connections held at once, at most (fewer with a low open files limit: [`connection_cap`]).
const MAX_CONNECTIONS: usize = 512;

/// The first pause after a failed accept; it doubles up to [`MAX_ACCEPT_PAUSE`].
const MIN_ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Binds `addr` now, so a taken port fails start-up instead of a background task.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Raises the soft open files limit to the hard one, as far as it goes, and says what it got:
/// the BPF objects, the endpoint's connections and the event socket's clients all take
/// descriptors, and many distributions start services with a soft limit of 1024.
pub fn raise_open_files_limit() {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!("open files limit raised from {soft} to {hard}"),
            Err(e) => tracing::warn!("open files limit {soft}: raising it to {hard}: {e}"),
        },
        Ok((soft, _)) => tracing::info!("open files limit {soft} (the hard limit)"),
        Err(e) => tracing::warn!("open files limit: reading it: {e}"),
    }
}

/// Serves until `shutdown` turns true; connections in flight finish on their own.
pub async fn serve(listener: TcpListener, metrics: Metrics, shutdown: watch::Receiver<bool>) {
    let open_files = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let cap = connection_cap(open_files);
    tracing::info!("metrics endpoint: at most {cap} connections (open files limit {open_files})");
    serve_capped(listener, metrics, shutdown, cap).await;
}

/// Connections held at once: a quarter of the open files limit (the rest is the agent's own),
/// at least a few, at most [`MAX_CONNECTIONS`].
fn connection_cap(open_files: u64) -> usize {
    usize::try_from(open_files / 4)
        .unwrap_or(usize::MAX)
        .clamp(4, MAX_CONNECTIONS)
}

/// [`serve`] with at most `cap` connections.
async fn serve_capped(
    listener: TcpListener,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
    cap: usize,
) {
    let mut open = Connections::new(cap);
    let mut errors = AcceptErrors::new("metrics endpoint");
    let mut made_room = RateLimited::new(Duration::from_secs(10));
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match conn {
            Ok(c) => {
                errors.succeeded();
                c
            }
            Err(e) => {
                if fds_exhausted(&e) {
                    // Ours to give back: the oldest connection that sent nothing.
                    open.close_one(false);
                }
                let pause = errors.failed(&e, Instant::now());
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        };
        let closed_one = open.make_room();
        if closed_one && let Some(n) = made_room.note(Instant::now()) {
            tracing::warn!(
                "metrics endpoint: {n} connection(s) closed to make room (at most {cap} held): a client holds connections open without sending requests"
            );
        }
        let (requested, close) = open.admit();
        tokio::spawn(connection(stream, peer, metrics.clone(), requested, close));
        if closed_one {
            // Under a flood, the connections accepted so far read what they were sent (a
            // scrape its request) and the closed one gives back its descriptor before more
            // are accepted.
            tokio::task::yield_now().await;
        }
    }
}

/// Whether accept failed for want of descriptors (the process's or the system's).
fn fds_exhausted(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Serves one connection until it ends, its client is too slow, it is too old, or it is closed
/// to make room.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    metrics: Metrics,
    requested: Arc<AtomicBool>,
    close: oneshot::Receiver<()>,
) {
    let service = service_fn(move |req| {
        requested.store(true, Ordering::Relaxed);
        std::future::ready(Ok::<_, Infallible>(respond(&req, &metrics)))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    // Only a send closes; a dropped sender (the endpoint stopping) lets the connection finish.
    let closed = async {
        if close.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = closed => return,
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            // A response in flight is finished first, within the time a request head gets.
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(HEADER_READ_TIMEOUT, conn).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        // Per connection, so never above trace: a flood would flood the log.
        tracing::trace!("metrics endpoint: connection from {peer}: {e}");
    }
}

/// The connections open, oldest first, each with whether it sent a request and a way to close
/// it. Owned by the accept loop; a connection that ended is dropped at the next accept.
#[derive(Debug)]
struct Connections {
    open: VecDeque<Open>,
    cap: usize,
}

#[derive(Debug)]
struct Open {
    /// Set when its first complete request head arrives.
    requested: Arc<AtomicBool>,
    /// Sending closes the connection; closed when the connection has ended.
    close: oneshot::Sender<()>,
}

impl Connections {
    fn new(cap: usize) -> Self {
        Self {
            open: VecDeque::new(),
            cap,
        }
    }

    /// Forgets the connections that ended; then, at the cap, closes the oldest one that has
    /// not sent a request (idle, or sending its head slowly), or else the oldest of all.
    /// Returns whether it closed one.
    fn make_room(&mut self) -> bool {
        self.open.retain(|c| !c.close.is_closed());
        self.open.len() >= self.cap && (self.close_one(false) || self.close_one(true))
    }

    /// Closes the oldest connection that has not sent a request (or, with `any`, the oldest).
    fn close_one(&mut self, any: bool) -> bool {
        let Some(i) = self
            .open
            .iter()
            .position(|c| any || !c.requested.load(Ordering::Relaxed))
        else {
            return false;
        };
        if let Some(c) = self.open.remove(i) {
            // Err: it ended meanwhile, which is as good.
            let _ = c.close.send(());
        }
        true
    }

    /// A new connection: whether it sent a request (for the connection to set) and what
    /// closes it (for the connection to watch).
    fn admit(&mut self) -> (Arc<AtomicBool>, oneshot::Receiver<()>) {
        let requested = Arc::new(AtomicBool::new(false));
        let (close, closed) = oneshot::channel();
        self.open.push_back(Open {
            requested: requested.clone(),
            close,
        });
        (requested, closed)
    }
}

/// Counts what happens and says so at most once per period, with how many since.
#[derive(Debug)]
struct RateLimited {
    every: Duration,
    since_said: u64,
    said: Option<Instant>,
}

impl RateLimited {
    fn new(every: Duration) -> Self {
        Self {
            every,
            since_said: 0,
            said: None,
        }
    }

    /// Counts one; returns the count to say when the period is over.
    fn note(&mut self, now: Instant) -> Option<u64> {
        self.since_said += 1;
        if self
            .said
            .is_some_and(|at| now.saturating_duration_since(at) < self.every)
        {
            return None;
        }
        self.said = Some(now);
        Some(std::mem::take(&mut self.since_said))
    }
}

/// Failed accepts (descriptors exhausted, mostly): the loop pauses before it tries again,
/// 100 ms doubling to 1 s, and logs at most once a second with how many failed, where
/// retrying at once would spin a CPU and flood the log.
#[derive(Debug)]
pub(crate) struct AcceptErrors {
    what: &'static str,
    pause: Duration,
    log: RateLimited,
}

impl AcceptErrors {
    pub(crate) fn new(what: &'static str) -> Self {
        Self {
            what,
            pause: MIN_ACCEPT_PAUSE,
            log: RateLimited::new(Duration::from_secs(1)),
        }
    }

    /// Counts a failure; returns how long to pause before the next accept.
    pub(crate) fn failed(&mut self, error: &std::io::Error, now: Instant) -> Duration {
        let pause = self.pause;
        self.pause = (self.pause * 2).min(MAX_ACCEPT_PAUSE);
        if let Some(n) = self.log.note(now) {
            tracing::warn!(
                "{}: accept failed {n} time(s) since last said: {error}; pausing {pause:?}",
                self.what
            );
        }
        pause
    }

    /// An accept went through: the next failure pauses briefly again.
    pub(crate) fn succeeded(&mut self) {
        self.pause = MIN_ACCEPT_PAUSE;
    }
}

fn respond<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        (&Method::GET, "/healthz") => health(metrics.shared.health.live(Instant::now()), "ok"),
        (&Method::GET, "/readyz") => {
            health(metrics.shared.health.is_ready(Instant::now()), "ready")
        }
        (&Method::GET, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "nodewarden: metrics at /metrics, probes at /healthz and /readyz (lock contention: `nodewarden top`, as root, on the event socket)\n"
                .to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

/// A probe's answer: 200 and `ok`, or 503 and why not.
fn health(state: Result<(), String>, ok: &str) -> (StatusCode, &'static str, String) {
    match state {
        Ok(()) => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            format!("{ok}\n"),
        ),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("{why}\n"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::outputs::metrics::Shared;

    fn get(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).expect("a request")
    }

    #[test]
    fn contention_is_not_served_over_http() {
        let metrics = Metrics::new(Shared::default());
        assert_eq!(
            respond(&get("/contention"), &metrics).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(respond(&get("/metrics"), &metrics).status(), StatusCode::OK);
        assert_eq!(respond(&get("/"), &metrics).status(), StatusCode::OK);
    }

    #[test]
    fn the_probes_answer_503_until_start_up_is_over() {
        let metrics = Metrics::new(Shared::default());
        assert_eq!(
            respond(&get("/readyz"), &metrics).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        metrics.shared.health.ready(Instant::now());
        assert_eq!(respond(&get("/readyz"), &metrics).status(), StatusCode::OK);
        assert_eq!(respond(&get("/healthz"), &metrics).status(), StatusCode::OK);
    }

    #[test]
    fn the_cap_is_a_quarter_of_the_open_files_limit() {
        assert_eq!(connection_cap(256), 64);
        assert_eq!(connection_cap(1_048_576), MAX_CONNECTIONS);
        assert_eq!(connection_cap(8), 4);
    }

    #[test]
    fn room_is_made_by_closing_the_oldest_that_sent_nothing() {
        let mut c = Connections::new(3);
        let (first, mut first_closed) = c.admit();
        let (_, mut second_closed) = c.admit();
        let (_, mut third_closed) = c.admit();
        first.store(true, Ordering::Relaxed);
        assert!(c.make_room());
        assert!(first_closed.try_recv().is_err(), "a requester is kept");
        assert!(second_closed.try_recv().is_ok(), "the oldest idle one goes");
        assert!(third_closed.try_recv().is_err());
        // Below the cap, nothing goes; one that ended is forgotten.
        drop(third_closed);
        assert!(!c.make_room());
        assert_eq!(c.open.len(), 1);
        // All sent requests: the oldest goes.
        let (later, _later_closed) = c.admit();
        let (last, _last_closed) = c.admit();
        later.store(true, Ordering::Relaxed);
        last.store(true, Ordering::Relaxed);
        assert!(c.make_room());
        assert!(first_closed.try_recv().is_ok());
    }

    #[test]
    fn failed_accepts_back_off_and_are_logged_once_a_second() {
        let mut e = AcceptErrors::new("test");
        let error = std::io::Error::from_raw_os_error(libc::EMFILE);
        let t0 = Instant::now();
        let pauses: Vec<Duration> = (0..6).map(|_| e.failed(&error, t0)).collect();
        assert_eq!(
            pauses,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        e.succeeded();
        assert_eq!(e.failed(&error, t0), MIN_ACCEPT_PAUSE);

        let mut log = RateLimited::new(Duration::from_secs(1));
        assert_eq!(log.note(t0), Some(1));
        assert_eq!(log.note(t0 + Duration::from_millis(10)), None);
        assert_eq!(log.note(t0 + Duration::from_millis(900)), None);
        assert_eq!(log.note(t0 + Duration::from_secs(1)), Some(3));
    }

    /// With the cap held by idle connections, a scrape is still answered, and the oldest idle
    /// connection is the one closed for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_scrape_is_served_while_idle_connections_fill_the_cap() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, shutdown) = watch::channel(false);
        let server = tokio::spawn(serve_capped(
            listener,
            Metrics::new(Shared::default()),
            shutdown,
            4,
        ));
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut scrape = TcpStream::connect(addr).await.expect("connect");
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), scrape.read_to_string(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let mut byte = [0];
        let oldest = tokio::time::timeout(Duration::from_secs(5), idle[0].read(&mut byte))
            .await
            .expect("closed in time");
        assert!(
            matches!(oldest, Ok(0))
                || oldest.is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
            "the oldest idle connection is closed"
        );
        let _ = stop.send(true);
        server.await.expect("the endpoint stops");
    }
}
