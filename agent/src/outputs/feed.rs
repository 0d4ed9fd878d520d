//! The live event feed: every record as a JSON line to each client of a Unix socket (what
//! `nodewarden events` reads). Root-only (mode 0600): events name processes and cgroups.

use std::{
    io::ErrorKind,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
    sync::{broadcast, watch},
};

use crate::model::record::Record;

/// Records waiting for a slow client before it is told it lost some.
const BACKLOG: usize = 4096;

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
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let conn = tokio::select! {
            conn = listener.accept() => conn,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        match conn {
            Ok((stream, _)) => {
                tokio::spawn(client(stream, feed.tx.subscribe()));
            }
            Err(e) => tracing::warn!("event feed: accept: {e}"),
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Streams records to one client until it goes away.
async fn client(mut stream: UnixStream, mut rx: broadcast::Receiver<Arc<str>>) {
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
