//! Counters, and the control socket through which `afsd stats` reads them.
//!
//! The running server owns the sled database (sled allows one process), so
//! `afsd stats` asks the server over a Unix socket in the state directory.

use crate::volume::Volume;
use common::proto::OpKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

pub struct Stats {
    rpcs: Vec<AtomicU64>,
    reintegrated: Vec<AtomicU64>,
    /// Objects found changed behind the server's back (each got a new
    /// version); the server's own changes must never count here.
    pub outside_edits: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        let n = OpKind::ALL.len();
        Stats {
            rpcs: (0..n).map(|_| AtomicU64::new(0)).collect(),
            reintegrated: (0..n).map(|_| AtomicU64::new(0)).collect(),
            outside_edits: AtomicU64::new(0),
        }
    }
}

fn index(kind: OpKind) -> usize {
    OpKind::ALL.iter().position(|k| *k == kind).expect("every kind is in ALL")
}

impl Stats {
    pub fn count(&self, kind: OpKind) {
        self.rpcs[index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one record replayed inside a reintegration.
    pub fn count_reintegrated(&self, kind: OpKind) {
        self.reintegrated[index(kind)].fetch_add(1, Ordering::Relaxed);
    }

    fn table(v: &[AtomicU64]) -> serde_json::Map<String, serde_json::Value> {
        OpKind::ALL
            .iter()
            .map(|k| (k.name().to_string(), serde_json::Value::from(v[index(*k)].load(Ordering::Relaxed))))
            .collect()
    }
}

pub fn snapshot(vol: &Volume) -> serde_json::Value {
    serde_json::json!({
        "rpcs": Stats::table(&vol.stats.rpcs),
        "reintegrated": Stats::table(&vol.stats.reintegrated),
        "clients": vol.callbacks.connected_clients(),
        "callbacks": vol.callbacks.promises_held(),
        "breaks_sent": vol.callbacks.breaks_sent.load(Ordering::Relaxed),
        "volume_stamp": vol.stamp(),
        "objects": vol.db.objects.len(),
        "reply_cache": vol.db.replies.len(),
        "outside_edits": vol.stats.outside_edits.load(Ordering::Relaxed),
        // Restarts in place after the database stopped (see `restart.rs`).
        "restarts": crate::restart::restarts(),
    })
}

pub fn socket_path(state: &Path) -> PathBuf {
    state.join("afsd.sock")
}

/// Serves `stats` requests on the control socket until the task is dropped.
pub async fn serve_control(listener: UnixListener, vol: Arc<Volume>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let vol = vol.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = BufReader::new(rd);
            if rd.read_line(&mut line).await.is_err() {
                return;
            }
            let reply = match line.trim() {
                "stats" => snapshot(&vol).to_string(),
                other => serde_json::json!({ "error": format!("unknown command {other:?}") }).to_string(),
            };
            let _ = wr.write_all(format!("{reply}\n").as_bytes()).await;
        });
    }
}

/// Asks a running server for its counters.
pub async fn query(state: &Path) -> Result<serde_json::Value, String> {
    let path = socket_path(state);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        format!("afsd does not seem to run on {}: cannot connect to {}: {e}", state.display(), path.display())
    })?;
    let (rd, mut wr) = stream.into_split();
    wr.write_all(b"stats\n").await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad reply from afsd: {e}"))
}
