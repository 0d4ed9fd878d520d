//! The agent's Unix socket, root-only (mode 0600): what it serves names processes, their
//! stacks and cgroups, which the metrics port (TCP, reachable by any local user or the pod
//! network) must not. A client first writes one line, its request:
//!
//! - `events`: every record from then on as a JSON line (what `nodewarden events` reads);
//! - `contention`: the contention snapshot as one JSON line (what `nodewarden top` reads),
//!   then the agent closes.
//!
//! Anything else gets one line `{"error": "..."}` and is closed, as is a client that sends no
//! request within [`REQUEST_TIMEOUT`]; at most [`MAX_CLIENTS`] are served at once.

use std::{
    io::{ErrorKind, Write as _},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, broadcast, watch},
};

use super::http::AcceptErrors;
use crate::model::{contention::Published, record::Record};

/// Records waiting for a slow client before it is told it lost some.
const BACKLOG: usize = 4096;

/// Longest a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest a request line, end included.
const MAX_REQUEST: usize = 64;

/// Longest a client may take to read the contention snapshot.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Clients served at once; more are refused with an error line.
const MAX_CLIENTS: usize = 32;

/// What a client asks for, in the line it writes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The records, live.
    Events,
    /// The contention snapshot, once.
    Contention,
}

impl Request {
    /// The request's line, without its end.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Events => "events",
            Self::Contention => "contention",
        }
    }

    fn parse(line: &str) -> Option<Self> {
        [Self::Events, Self::Contention]
            .into_iter()
            .find(|r| r.as_str() == line)
    }
}

/// Why a client was not served.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no request within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("request longer than {MAX_REQUEST} bytes")]
    TooLong,
    #[error("closed before a request")]
    Closed,
    #[error("reading the request: {0}")]
    Read(std::io::Error),
    #[error("unknown request {0:?}: send `events` or `contention`")]
    Unknown(String),
    #[error("too many clients (at most {MAX_CLIENTS})")]
    Busy,
}

impl Refused {
    /// The line that tells the client.
    fn line(&self) -> String {
        let mut line = serde_json::json!({ "error": self.to_string() }).to_string();
        line.push('\n');
        line
    }
}

/// Publishes records to the connected clients; costs nothing when none is connected.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<str>>,
}

impl Feed {
    #[must_use]
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
        }
    }

    pub fn publish(&self, record: &Record) {
        if self.tx.receiver_count() == 0 {
            return;
        }
        match serde_json::to_string(record) {
            Ok(line) => {
                let _ = self.tx.send(line.into());
            }
            Err(e) => tracing::warn!("event feed: encoding a record: {e}"),
        }
    }
}

impl Default for Feed {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("event socket {path}: another agent is serving it")]
    InUse { path: PathBuf },
    #[error("event socket {path}: exists and is not a socket; not touching it")]
    NotSocket { path: PathBuf },
    // `error`, not `source`: the message already says it, and anyhow would repeat a source.
    #[error("event socket {path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Binds the socket at `path` (creating its directory), replacing a stale one left by an agent
/// that died, but never one a live agent serves.
pub async fn bind(path: &Path) -> Result<UnixListener, FeedError> {
    let io = |error| FeedError::Io {
        path: path.to_owned(),
        error,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match UnixStream::connect(path).await {
        Ok(_) => {
            return Err(FeedError::InUse {
                path: path.to_owned(),
            });
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        // Only a socket nobody serves is ours to replace; any other file stays.
        Err(_) if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) => {
            std::fs::remove_file(path).map_err(io)?;
        }
        Err(_) => {
            return Err(FeedError::NotSocket {
                path: path.to_owned(),
            });
        }
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves clients until `shutdown` turns true, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    feed: Feed,
    contention: Arc<Mutex<Published>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut errors = AcceptErrors::new("event socket");
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match conn {
            Ok((stream, _)) => {
                errors.succeeded();
                stream
            }
            Err(e) => {
                let pause = errors.failed(&e, Instant::now());
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    _ = shutdown.wait_for(|stop| *stop) => break,
                }
            }
        };
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            // A new socket's buffer takes the line whole; nothing waits for the client.
            let _ = stream.try_write(Refused::Busy.line().as_bytes());
            continue;
        };
        // Subscribed now, before the request is read: a client sees every record published
        // after it connected.
        let rx = feed.tx.subscribe();
        let contention = contention.clone();
        tokio::spawn(async move {
            client(stream, rx, &contention).await;
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Reads one client's request and serves it.
async fn client(
    mut stream: UnixStream,
    rx: broadcast::Receiver<Arc<str>>,
    contention: &Mutex<Published>,
) {
    let request = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut stream))
        .await
        .unwrap_or(Err(Refused::Timeout))
        .and_then(|line| Request::parse(&line).ok_or(Refused::Unknown(line)));
    match request {
        Ok(Request::Events) => events(stream, rx).await,
        Ok(Request::Contention) => {
            drop(rx);
            let mut line = contention
                .lock()
                .ok()
                .and_then(|p| serde_json::to_string(&p.snapshot).ok())
                .unwrap_or_else(|| "{}".to_owned());
            line.push('\n');
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, stream.write_all(line.as_bytes())).await;
        }
        Err(refused) => {
            tracing::debug!("event socket: client refused: {refused}");
            let _ =
                tokio::time::timeout(ANSWER_TIMEOUT, stream.write_all(refused.line().as_bytes()))
                    .await;
        }
    }
}

/// The client's request line, without its end.
async fn read_request(stream: &mut UnixStream) -> Result<String, Refused> {
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        let Some(free) = buf.get_mut(len..).filter(|f| !f.is_empty()) else {
            return Err(Refused::TooLong);
        };
        let n = stream.read(free).await.map_err(Refused::Read)?;
        if n == 0 {
            return Err(Refused::Closed);
        }
        len += n;
        let got = buf.get(..len).unwrap_or_default();
        if let Some(end) = got.iter().position(|&b| b == b'\n') {
            let line = got.get(..end).unwrap_or_default();
            return Ok(String::from_utf8_lossy(line).trim().to_owned());
        }
    }
}

/// Streams records to one client until it goes away.
async fn events(mut stream: UnixStream, mut rx: broadcast::Receiver<Arc<str>>) {
    loop {
        let line = match rx.recv().await {
            Ok(line) => line,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                format!("{{\"kind\":\"lost\",\"count\":{n}}}").into()
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if stream.write_all(line.as_bytes()).await.is_err()
            || stream.write_all(b"\n").await.is_err()
        {
            return;
        }
    }
}

/// Connects to the agent's socket at `path` and sends `request`: the client side, blocking,
/// for the commands.
pub fn connect(path: &Path, request: Request) -> std::io::Result<std::os::unix::net::UnixStream> {
    let mut stream = std::os::unix::net::UnixStream::connect(path)?;
    writeln!(stream, "{}", request.as_str())?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncBufReadExt as _, BufReader},
        task::JoinHandle,
    };

    use super::*;
    use crate::model::{
        contention::{ProcessWaits, Snapshot},
        record::CgroupChange,
    };

    /// An agent's socket in a directory of its own, served until the test ends.
    struct Served {
        dir: PathBuf,
        path: PathBuf,
        feed: Feed,
        stop: watch::Sender<bool>,
        server: JoinHandle<()>,
    }

    impl Served {
        async fn start(name: &str, published: Published) -> Self {
            let dir = std::env::temp_dir().join(format!("nw-feed-{name}-{}", std::process::id()));
            let path = dir.join("events.sock");
            let listener = bind(&path).await.expect("bind");
            let feed = Feed::new();
            let (stop, shutdown) = watch::channel(false);
            let server = tokio::spawn(serve(
                listener,
                path.clone(),
                feed.clone(),
                Arc::new(Mutex::new(published)),
                shutdown,
            ));
            Self {
                dir,
                path,
                feed,
                stop,
                server,
            }
        }

        /// A client that sent `request` (its line end included).
        async fn ask(&self, request: &str) -> UnixStream {
            let mut s = UnixStream::connect(&self.path).await.expect("connect");
            s.write_all(request.as_bytes()).await.expect("send");
            s
        }

        async fn stop(self) {
            let _ = self.stop.send(true);
            self.server.await.expect("the server stops");
            assert!(!self.path.exists(), "the socket is removed");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The agent's one line, and that it closes after it. Read as a line first: a client it
    /// closed before reading all it sent gets the line, then a reset.
    async fn answer(s: UnixStream) -> String {
        let mut s = BufReader::new(s);
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_line(&mut line))
            .await
            .expect("answered in time")
            .expect("read");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("closed in time");
        let closed = match closed {
            Ok(_) => rest.is_empty(),
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
        };
        assert!(closed, "more than one line: {rest:?}");
        line
    }

    #[tokio::test]
    async fn events_streams_published_records_on_a_root_only_socket() {
        let served = Served::start("events", Published::default()).await;
        let mode = std::fs::metadata(&served.path)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let client = served.ask("events\n").await;
        // Subscribed once accepted; the record is sent once the request is read.
        let start = Instant::now();
        while served.feed.tx.receiver_count() == 0 {
            assert!(start.elapsed() < Duration::from_secs(5), "never accepted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let record = Record::CgroupCreated(CgroupChange {
            time_unix_nano: 1,
            cgroup: "/a".into(),
        });
        served.feed.publish(&record);
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(client).read_line(&mut line),
        )
        .await
        .expect("a record in time")
        .expect("read");
        assert_eq!(
            serde_json::from_str::<Record>(&line).expect("a record"),
            record
        );
        served.stop().await;
    }

    #[tokio::test]
    async fn contention_answers_the_snapshot_and_closes() {
        let mut published = Published::default();
        published.snapshot.processes.push(ProcessWaits {
            pid: 7,
            comm: "nw-mutex".into(),
            cgroup: "/a".into(),
            woken: 10,
            wait_seconds: 0.5,
            eagain: 3,
            timeouts: 0,
        });
        let expected = published.snapshot.clone();
        let served = Served::start("contention", published).await;
        let text = answer(served.ask("contention\n").await).await;
        assert!(
            text.ends_with('\n') && text.lines().count() == 1,
            "{text:?}"
        );
        assert_eq!(
            serde_json::from_str::<Snapshot>(&text).expect("a snapshot"),
            expected
        );
        served.stop().await;
    }

    #[tokio::test]
    async fn an_unknown_request_gets_an_error_line() {
        let served = Served::start("unknown", Published::default()).await;
        for (request, says) in [
            ("GET /contention HTTP/1.1\r\n", "unknown request"),
            (&"x".repeat(MAX_REQUEST + 1), "longer than"),
        ] {
            let text = answer(served.ask(request).await).await;
            let error: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert!(
                error["error"].as_str().is_some_and(|e| e.contains(says)),
                "{request:?}: {text}"
            );
        }
        served.stop().await;
    }

    #[tokio::test]
    async fn clients_beyond_the_cap_are_refused() {
        let served = Served::start("busy", Published::default()).await;
        let mut waiting = Vec::new();
        for _ in 0..MAX_CLIENTS {
            waiting.push(served.ask("").await);
        }
        let text = answer(served.ask("contention\n").await).await;
        assert!(text.contains("too many clients"), "{text}");
        drop(waiting);
        served.stop().await;
    }
}
