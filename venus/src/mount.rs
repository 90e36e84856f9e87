//! Running a mount: open the cache, connect, validate what is cached, serve
//! FUSE until unmounted or signalled, then finish pending stores and leave
//! the cache marked clean. A keeper task watches the connection: heartbeats
//! while connected, probes while disconnected, reintegration on return.

use crate::cache::Cache;
use crate::fs::Venus;
use crate::fuse::FuseAdapter;
use crate::link::{Link, State, HEARTBEAT, HEARTBEAT_TIMEOUT, PROBE};
use anyhow::Context;
use common::auth::Key;
use common::proto::{Push, VolumeStamp, VolumeStampReq};
use common::rpc::{Client, ClientConfig, ClientEvent};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub struct MountOptions {
    pub mountpoint: PathBuf,
    pub server: String,
    pub key: PathBuf,
    pub cache: PathBuf,
    pub cache_size: u64,
    /// Seconds between hoard walks while connected.
    pub hoard_interval: u64,
}

/// Sequence numbers are reserved in blocks, persisted before use, so a
/// restarted venus never reuses a transaction id.
const SEQ_BLOCK: u64 = 100_000;

fn client_identity(cache: &Cache) -> anyhow::Result<(Uuid, u64)> {
    let id = match cache.meta_get("client_id") {
        Some(b) => Uuid::from_slice(&b).context("corrupt client id in the cache index")?,
        None => {
            let id = Uuid::new_v4();
            cache.meta_put("client_id", id.as_bytes())?;
            id
        }
    };
    let hwm = cache.meta_get("seq_hwm").map(|b| crate::cache::be(&b)).unwrap_or(0);
    cache.meta_put("seq_hwm", &(hwm + SEQ_BLOCK).to_be_bytes())?;
    cache.flush()?;
    Ok((id, hwm))
}

fn saved_stamp(cache: &Cache) -> Option<VolumeStamp> {
    cache.meta_get("volume_stamp").and_then(|b| rmp_serde::from_slice(&b).ok())
}

pub fn run(opts: MountOptions) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    // Caught from the start: a signal between mounting and a late handler
    // would kill venus with the default action and leave a dead mount.
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    let key = Key::load(&opts.key)?;
    let cache = Cache::open(&opts.cache, opts.cache_size)
        .with_context(|| format!("opening the cache in {}", opts.cache.display()))?;
    // sled can deadlock (see `sled_watchdog`); venus cannot restart under
    // its mount, so it says so, once.
    let _watchdog = {
        let told = std::sync::atomic::AtomicBool::new(false);
        common::sled_watchdog::Watchdog::start(cache.db(), Duration::from_secs(10), move |stuck| {
            if !told.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(?stuck, "the cache index has stopped (a sled deadlock): restart venus");
            }
        })
        .context("starting the cache index watchdog")?
    };
    let was_clean = cache.meta_get("clean").is_some_and(|v| v == [1]);
    let forced = cache.meta_get("forced_offline").is_some_and(|v| v == [1]);
    let (client_id, seq_floor) = client_identity(&cache)?;
    let mut cfg = ClientConfig::new(opts.server.clone(), key, client_id);
    // A lost server (no reply, no pong) is noticed within a few seconds; a
    // busy one that still answers pings is waited for, up to two minutes.
    cfg.attempt_timeout = Duration::from_secs(2);
    cfg.call_timeout = Duration::from_secs(5);
    cfg.busy_limit = Duration::from_secs(120);
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.manual_break_acks = true;
    let client = Client::new(cfg);
    client.resume_sequence_after(seq_floor);
    let meta = cache.meta_tree();
    client.reserve_sequences(
        seq_floor + SEQ_BLOCK,
        SEQ_BLOCK,
        Arc::new(move |limit: u64| {
            let saved = meta.insert("seq_hwm", &limit.to_be_bytes()).and_then(|_| meta.flush());
            if let Err(e) = saved {
                tracing::error!("could not persist the transaction id reservation: {e}");
            }
        }),
    );
    let mountpoint = std::fs::canonicalize(&opts.mountpoint).unwrap_or_else(|_| opts.mountpoint.clone());
    let venus = Arc::new(Venus::new(rt.handle().clone(), client.clone(), cache, Link::new(forced), mountpoint)?);
    // Records sent before a restart, and stores cut short by it, keep their
    // replies held on the server.
    for r in venus.cml.records() {
        if let Some(s) = r.seq {
            client.hold(s);
        }
    }
    venus.cache.visit(|_, n| {
        if let Some(s) = n.store_seq {
            client.hold(s);
        }
    });
    let mut events = client.events();

    rt.block_on(startup(&venus, was_clean))?;
    venus.cache.meta_put("clean", &[0])?;
    venus.cache.flush()?;

    // Callback breaks and connection events.
    let v = venus.clone();
    rt.spawn(async move {
        while let Some(ev) = events.recv().await {
            match ev {
                ClientEvent::Push(Push::Break { id, fids }) => {
                    let v2 = v.clone();
                    // Kernel invalidation may wait on inode locks held by a
                    // request of ours that itself waits on the server: give
                    // it a moment, then acknowledge regardless.
                    let job = tokio::task::spawn_blocking(move || v2.on_break(&fids));
                    let _ = tokio::time::timeout(Duration::from_millis(250), job).await;
                    v.client.ack_break(id).await;
                }
                ClientEvent::Push(Push::BreakAll) => {
                    tracing::info!("server asked for a full revalidation");
                    match v.revalidate_all().await {
                        Ok((ok, stale)) => tracing::info!(current = ok, stale, "cache revalidated"),
                        Err(e) => tracing::warn!("revalidation failed: {e}"),
                    }
                }
                ClientEvent::Connected { conn } => tracing::debug!(conn, "connection established"),
                ClientEvent::Lost { conn } => {
                    tracing::debug!(conn, "connection lost");
                    // Only a connected venus needs to check at once; waking a
                    // disconnected prober here would make it spin.
                    if v.link.is_connected() {
                        v.link.wake.notify_one();
                    }
                }
            }
        }
    });
    rt.spawn(keeper(venus.clone()));
    // Periodic hoard walks while connected.
    let v = venus.clone();
    let interval = Duration::from_secs(opts.hoard_interval.max(1));
    rt.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            if v.link.is_connected() && !v.hoard.list().is_empty() {
                walk_in_background(v.clone(), "periodic").await;
            }
        }
    });
    // Large directory listings reach the index in batches (see cache.rs).
    let v = venus.clone();
    rt.spawn(async move {
        loop {
            tokio::time::sleep(crate::cache::DEFERRED_EVERY).await;
            v.cache.write_deferred();
        }
    });
    // Every 2 s: container names left by renumbering (a file created on
    // close gets its server fid), files whose create a failed close left
    // waiting, and stores left dirty by a crash.
    let v = venus.clone();
    rt.spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if let Err(e) = tokio::task::block_in_place(|| v.cache.drop_old_names()) {
                tracing::warn!("cannot flush the cache index: {e}");
            }
            if v.link.is_connected() {
                v.create_orphaned_deferred().await;
            }
            if v.link.is_connected() && v.cml.is_empty() && v.cache.count_where(|n| n.dirty) > 0 {
                let n = v.store_dirty().await;
                if n > 0 {
                    tracing::info!(stored = n, "deferred stores reached the server");
                }
            }
        }
    });
    let sock = crate::control::socket_path(&opts.cache);
    let _ = std::fs::remove_file(&sock);
    let listener =
        rt.block_on(async { tokio::net::UnixListener::bind(&sock) }).context("binding the control socket")?;
    rt.spawn(crate::control::serve(listener, venus.clone()));

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("venus:{}", opts.server)),
        fuser::MountOption::Subtype("afs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(4);
    config.clone_fd = true;
    let (initialised, init_rx) = std::sync::mpsc::sync_channel(1);
    let adapter = FuseAdapter { venus: venus.clone(), passthrough: Arc::new(AtomicBool::new(false)), initialised };
    let session = fuser::Session::new(adapter, &opts.mountpoint, &config)
        .with_context(|| format!("mounting on {}", opts.mountpoint.display()))?;
    let _ = venus.notifier.set(session.notifier());
    let bg = session.spawn()?;

    // Until a signal, or until someone unmounts us.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<&'static str>();
    let tx = done_tx.clone();
    rt.spawn(async move {
        tokio::select! {
            _ = term.recv() => { let _ = tx.send("SIGTERM"); }
            _ = int.recv() => { let _ = tx.send("SIGINT"); }
        }
    });
    // "Mounted" only once the kernel finished its handshake: a program
    // started on that word finds a working mount.
    if init_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        tracing::warn!("the kernel has not initialised the FUSE session after 10 s");
    }
    tracing::info!(mountpoint = %opts.mountpoint.display(), server = %opts.server, "mounted");
    println!("venus mounted {}", opts.mountpoint.display());
    let mp = opts.mountpoint.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(200));
        if !is_mounted(&mp) {
            let _ = done_tx.send("unmounted");
            return;
        }
    });
    let why = done_rx.recv().unwrap_or("channel closed");
    tracing::info!("{why}: finishing pending stores and unmounting");
    if let Err(e) = bg.umount_and_join() {
        tracing::warn!("unmount: {e}");
    }
    rt.block_on(async {
        if venus.link.is_connected() {
            if !venus.cml.is_empty() {
                let _ = venus.reintegrate().await;
            }
            venus.store_dirty().await;
            if let Ok(stamp) = venus.remote(venus.client.volume_stamp(VolumeStampReq {})).await {
                let _ = venus.cache.meta_put("volume_stamp", &rmp_serde::to_vec(&stamp).unwrap_or_default());
            }
        }
    });
    let dirty = venus.cache.count_where(|n| n.dirty);
    venus.cache.meta_put("clean", &[1])?;
    venus.cache.flush()?;
    let _ = std::fs::remove_file(&sock);
    if dirty > 0 || !venus.cml.is_empty() {
        tracing::warn!(
            dirty,
            logged = venus.cml.len(),
            "unmounted with changes the server has not got yet; they are kept and sent on the next mount"
        );
    }
    tracing::info!("venus stopped");
    Ok(())
}

/// One validation round: if the volume stamp is the one saved at the last
/// clean unmount nothing changed; otherwise the cached versions are checked
/// in one batch. Then the log (if any) is reintegrated.
async fn startup(venus: &Venus, was_clean: bool) -> anyhow::Result<()> {
    if venus.link.forced() {
        tracing::info!("starting disconnected, as the user asked (venus reconnect to go online)");
        return Ok(());
    }
    match venus.client.volume_stamp(VolumeStampReq {}).await {
        Ok(stamp) => {
            let saved = saved_stamp(&venus.cache);
            if was_clean && saved.as_ref() == Some(&stamp) {
                tracing::info!(stamp = stamp.stamp, "volume unchanged since the last mount: cache is current");
            } else {
                let (ok, stale) = venus.revalidate_all().await?;
                tracing::info!(current = ok, stale, "cache validated against the server");
            }
            if !venus.cml.is_empty() {
                venus.link.set(State::Reintegrating, "log left from the last run");
                match venus.reintegrate().await {
                    Ok(_) => venus.link.set(State::Connected, "reintegration complete"),
                    Err(e) => venus.link.set(State::Disconnected, format!("reintegration failed: {e}")),
                }
            }
            let stored = venus.store_dirty().await;
            if stored > 0 {
                tracing::info!(stored, "stores left from the last run reached the server");
            }
        }
        Err(common::rpc::RpcError::Refused(why)) => anyhow::bail!("the server refused this client: {why}"),
        Err(e) => {
            venus.link.set(State::Disconnected, format!("server unreachable at startup: {e}"));
            venus.cache.invalidate_all();
        }
    }
    Ok(())
}

/// Watches the connection: a heartbeat while connected; while disconnected
/// (and not by the user's wish) a probe, then reintegration.
async fn keeper(v: Arc<Venus>) {
    loop {
        match v.link.state() {
            State::Connected => {
                let _ = tokio::time::timeout(HEARTBEAT, v.link.wake.notified()).await;
                if !v.link.is_connected() {
                    continue;
                }
                if let Err(e) = v.client.ping(HEARTBEAT_TIMEOUT).await {
                    v.link.lost(format!("heartbeat unanswered: {e}"));
                } else if !v.cml.is_empty() {
                    // Changes logged just as reintegration finished: send them.
                    v.link.set(State::Reintegrating, "changes logged during reintegration");
                    if let Err(e) = v.reintegrate().await {
                        v.link.set(State::Disconnected, format!("reintegration interrupted: {e}"));
                    } else {
                        v.link.set(State::Connected, "reintegration complete");
                    }
                }
            }
            State::Disconnected | State::Reintegrating => {
                v.client.disconnect().await;
                if v.link.forced() {
                    v.link.wake.notified().await;
                    if v.link.forced() {
                        continue;
                    }
                } else {
                    let _ = tokio::time::timeout(PROBE, v.link.wake.notified()).await;
                }
                if v.link.forced() || v.client.ping(Duration::from_secs(1)).await.is_err() {
                    continue;
                }
                v.link.set(State::Reintegrating, "the server answers again");
                match v.reintegrate().await {
                    Ok(_) => {
                        v.link.set(State::Connected, "reintegration complete");
                        let n = v.store_dirty().await;
                        if n > 0 {
                            tracing::info!(stored = n, "deferred stores reached the server");
                        }
                        // Back online: bring the hoard up to date.
                        if !v.hoard.list().is_empty() {
                            tokio::spawn(walk_in_background(v.clone(), "after reconnection"));
                        }
                    }
                    Err(e) => {
                        v.link.set(State::Disconnected, format!("reintegration interrupted: {e}"));
                        // Back off before trying again.
                        tokio::time::sleep(PROBE * 5).await;
                    }
                }
            }
        }
    }
}

async fn walk_in_background(v: Arc<Venus>, why: &'static str) {
    let r = tokio::task::spawn_blocking(move || v.hoard_walk(&mut |_, _, _, _| {})).await;
    match r {
        Ok(Ok(s)) if !s.did_not_fit.is_empty() || !s.failed.is_empty() => {
            tracing::warn!(why, failed = s.failed.len(), did_not_fit = s.did_not_fit.len(), "hoard walk incomplete")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::debug!(why, "hoard walk skipped: {e}"),
        Err(e) => tracing::warn!(why, "hoard walk failed: {e}"),
    }
}

fn is_mounted(mountpoint: &std::path::Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return true };
    let target = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1).map(|m| m.replace("\\040", " ")) == Some(target.display().to_string()))
}
