//! Starting and stopping the server: state directory, recovery, listener,
//! watcher, control socket, and a clean shutdown on SIGTERM/SIGINT.

use crate::db::{self, Db};
use crate::export::Export;
use crate::restart;
use crate::volume::Volume;
use anyhow::{bail, Context};
use common::auth::Key;
use common::proto::{OpKind, Reply, Xid};
use common::rpc::{Hooks, Pusher, RpcServer};
use common::sled_watchdog::Watchdog;
use common::FsError;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use uuid::Uuid;

/// The staging area's name when it has to live inside the export.
const STAGING_IN_EXPORT: &str = ".afsd-staging";

impl Hooks for Volume {
    fn connected(&self, client: Uuid, conn: u64, push: Pusher) {
        self.callbacks.connected(client, conn, push);
    }

    fn disconnected(&self, client: Uuid, conn: u64) {
        self.callbacks.disconnected(client, conn);
    }

    fn recorded_reply(&self, xid: &Xid) -> Option<Result<Reply, FsError>> {
        Volume::recorded_reply(self, xid)
    }

    fn acknowledged(&self, client: Uuid, seq: u64) {
        let lo = db::reply_key(client, 0);
        let hi = db::reply_key(client, seq);
        for (k, _) in self.db.replies.range(lo..=hi).flatten() {
            let _ = self.db.replies.remove(k);
        }
    }

    fn count(&self, kind: OpKind) {
        self.stats.count(kind);
    }

    /// A chunk read only looks up its handle and stats the file (the
    /// writer sends the bytes), so it can run in the reader; in order, the
    /// file is read front to back, as sequential readahead expects.
    fn answered_in_order(&self, kind: OpKind) -> bool {
        kind == OpKind::ReadChunk
    }

    async fn before_reply(&self, xid: &Xid, kind: OpKind) {
        Volume::before_reply(self, xid, kind).await;
    }
}

pub struct Options {
    pub export: PathBuf,
    pub state: PathBuf,
    pub listen: String,
}

/// Where staged stores wait: in the state directory when it shares a
/// filesystem with the export (rename must not cross devices), else in a
/// hidden directory at the export root that clients never see.
fn staging_dir(export: &Path, state: &Path) -> anyhow::Result<(PathBuf, Option<String>)> {
    let same_fs = std::fs::metadata(export)?.dev() == std::fs::metadata(state)?.dev();
    let (path, in_export) = if same_fs {
        (state.join("staging"), None)
    } else {
        (export.join(STAGING_IN_EXPORT), Some(STAGING_IN_EXPORT.to_string()))
    };
    std::fs::create_dir_all(&path).with_context(|| format!("creating staging directory {}", path.display()))?;
    Ok((path, in_export))
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    // Modes sent by clients are applied as given.
    unsafe { libc::umask(0) };
    if !opts.export.is_dir() {
        bail!("export {} is not a directory", opts.export.display());
    }
    std::fs::create_dir_all(&opts.state).with_context(|| format!("creating state dir {}", opts.state.display()))?;
    let export_path = opts.export.canonicalize()?;
    let key = Key::load_or_create(&opts.state.join("afs.key"))?;
    let db = Arc::new(Db::open(&opts.state).map_err(anyhow::Error::msg)?);
    // A database that stops for good (see `sled_watchdog`) gets a restart in
    // place; the listening socket goes along once there is one.
    let failpoint = std::env::var("AFSD_FAILPOINT").ok().filter(|_| restart::restarts() == 0);
    let stall_test = failpoint.as_deref() == Some("stall-db");
    // A socket handed over by a restart is taken first: a restart during
    // recovery must hand it on again.
    let inherited = restart::inherited_listener()?;
    let listen_fd = Arc::new(AtomicI32::new(inherited.as_ref().map_or(-1, |l| l.as_raw_fd())));
    let stopping = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (listen_fd, stopping) = (listen_fd.clone(), stopping.clone());
        let limit = if stall_test { Duration::from_secs(1) } else { restart::STUCK_LIMIT };
        let warned = AtomicBool::new(false);
        Watchdog::start(&db.db, limit.min(Duration::from_secs(2)), move |stuck| {
            if stuck < limit {
                if !warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(?stuck, "a database write is stuck");
                }
                return;
            }
            if stopping.load(Ordering::SeqCst) {
                // Asked to stop: stop, and leave the rest to recovery.
                tracing::error!(?stuck, "the database has stopped (a sled deadlock) while shutting down");
                std::process::abort();
            }
            tracing::error!(?stuck, "the database has stopped (a sled deadlock): restarting afsd in place");
            let fd = listen_fd.load(Ordering::SeqCst);
            restart::exec_self((fd >= 0).then_some(fd));
        })
        .context("starting the database watchdog")?
    };
    let first_start = db.objects.is_empty();
    let was_clean = db.meta_u64(db::META_CLEAN) == 1;
    let (staging, in_export) = staging_dir(&export_path, &opts.state)?;
    let export = Export::open(&export_path).map_err(|e| anyhow::anyhow!("opening export: {e}"))?;
    let vol = Arc::new(Volume::new(export, db.clone(), staging, in_export).map_err(|e| anyhow::anyhow!("{e}"))?);
    vol.init_root().map_err(|e| anyhow::anyhow!("{e}"))?;
    let redone = vol.recover().map_err(|e| anyhow::anyhow!("recovery: {e}"))?;
    let dropped = vol.clear_staging().map_err(|e| anyhow::anyhow!("clearing staging: {e}"))?;
    if !first_start && !was_clean {
        let n = vol.callbacks.break_all_known_clients().map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::warn!(redone, dropped, clients = n, "previous run did not shut down cleanly: clients will revalidate");
    }
    db.meta.insert(db::META_CLEAN, &0u64.to_be_bytes())?;
    db.db.flush_async().await?;

    let listener = match inherited {
        Some(l) => {
            tracing::warn!(restarts = restart::restarts(), "restarted in place after the database stopped");
            TcpListener::from_std(l)?
        }
        None => TcpListener::bind(&opts.listen).await.with_context(|| format!("listening on {}", opts.listen))?,
    };
    listen_fd.store(listener.as_raw_fd(), Ordering::SeqCst);
    let addr = listener.local_addr()?;
    let sock = crate::stats::socket_path(&opts.state);
    let _ = std::fs::remove_file(&sock);
    let control = UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    tokio::spawn(crate::stats::serve_control(control, vol.clone()));
    let _watcher = crate::watch::start(vol.clone()).context("watching the export")?;
    tokio::spawn(vol.clone().run_settler());
    let reaper = vol.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            reaper.handles.reap_idle();
        }
    });

    let server_id = vol.server_id;
    let rpc = RpcServer::new(vol.clone(), key, server_id);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serving = tokio::spawn(rpc.serve(listener, stop_rx));
    tracing::info!(export = %export_path.display(), %addr, volume = %vol.volume_id, "afsd serving");
    // Tests and scripts read the bound address (useful with port 0).
    println!("afsd listening on {addr}");
    std::fs::write(opts.state.join("afsd.addr"), addr.to_string())?;
    if stall_test {
        // Tests: sled "stops" now, with a client or two connected.
        watchdog.simulate_stall();
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    stopping.store(true, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    let _ = serving.await;
    // Nothing is left for recovery to redo after a clean stop.
    vol.settle_now();
    db.meta.insert(db::META_CLEAN, &1u64.to_be_bytes())?;
    db.db.flush_async().await?;
    let _ = std::fs::remove_file(&sock);
    tracing::info!("afsd stopped cleanly");
    Ok(())
}
