//! Callback promises: who caches what, and telling them when it changes.
//!
//! A promise is a (fid, client) entry in sled with an expiry. Breaking an
//! object removes its promises and pushes a break to every holder that is
//! connected; a holder that is away gets the break recorded in `pending` and
//! delivered first thing when it reconnects, so it never trusts a stale copy.
//!
//! Promises are written without an fsync of their own (that would cost one
//! per fetch). Instead the server records whether it shut down cleanly; after
//! a crash every known client is sent `BreakAll` on reconnect and revalidates
//! (one `validate` round), which is safe whatever the crash lost.

use crate::db::{be_u64, callback_key, db_err, pending_key, Db};
use common::proto::{Promise, Push};
use common::rpc::{BreakOutcome, Pusher};
use common::{Fid, FsError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// How long a promise lasts without renewal.
pub const PROMISE_LIFETIME: Duration = Duration::from_secs(2 * 3600);

/// How long a change waits for holders to acknowledge its break.
const BREAK_ACK_WAIT: Duration = Duration::from_secs(2);

/// The marker fid in `pending` meaning "revalidate everything".
const BREAK_ALL: Fid = Fid(u64::MAX);

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub struct Callbacks {
    db: Arc<Db>,
    /// Connected clients: (connection id, pusher).
    sessions: Mutex<HashMap<Uuid, (u64, Pusher)>>,
    pub breaks_sent: AtomicU64,
}

impl Callbacks {
    pub fn new(db: Arc<Db>) -> Callbacks {
        Callbacks { db, sessions: Mutex::new(HashMap::new()), breaks_sent: AtomicU64::new(0) }
    }

    pub fn connected_clients(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    pub fn promises_held(&self) -> usize {
        self.db.callbacks.len()
    }

    /// Gives `client` a promise on `fid`. Call this before reading the
    /// object, so a change racing with the read breaks the new promise.
    pub fn promise(&self, client: Uuid, fid: Fid) -> Result<Promise, FsError> {
        let expires = now_secs() + PROMISE_LIFETIME.as_secs() as i64;
        self.db.callbacks.insert(callback_key(fid, client), &expires.to_be_bytes()).map_err(db_err)?;
        Ok(Promise { expires })
    }

    /// A client connected: deliver what it missed, then remember its pusher.
    pub fn connected(&self, client: Uuid, conn: u64, pusher: Pusher) {
        let first_visit = matches!(self.db.clients.insert(client.as_bytes(), &now_secs().to_be_bytes()), Ok(None));
        if first_visit {
            // After a crash only the clients on record are told to
            // revalidate, so a new client's record must be durable before it
            // can be given a promise. Its requests are read only after this.
            if let Err(e) = tokio::task::block_in_place(|| self.db.flush_now()) {
                tracing::error!(%client, "cannot record a new client durably: {e}");
            }
        }
        let mut missed = Vec::new();
        let mut keys = Vec::new();
        let mut all = false;
        for (k, _) in self.db.pending.scan_prefix(client.as_bytes()).flatten() {
            let fid = Fid(be_u64(&k[16..]));
            if fid == BREAK_ALL {
                all = true;
            } else {
                missed.push(fid);
            }
            keys.push(k);
        }
        // Queued before any reply can be sent on this connection; the record
        // of them goes only once they are on their way.
        if all || !missed.is_empty() {
            tracing::info!(%client, count = missed.len(), all, "delivering breaks missed while away");
            self.breaks_sent.fetch_add(missed.len() as u64, Ordering::Relaxed);
            let sends = (
                all.then(|| pusher.push(Push::BreakAll)),
                (!missed.is_empty()).then(|| pusher.push(Push::Break { id: 0, fids: missed })),
            );
            let db = self.db.clone();
            tokio::spawn(async move {
                let mut ok = true;
                if let Some(f) = sends.0 {
                    ok &= f.await;
                }
                if let Some(f) = sends.1 {
                    ok &= f.await;
                }
                if ok {
                    for k in keys {
                        let _ = db.pending.remove(k);
                    }
                }
            });
        }
        self.sessions.lock().unwrap().insert(client, (conn, pusher));
    }

    pub fn disconnected(&self, client: Uuid, conn: u64) {
        let mut s = self.sessions.lock().unwrap();
        if matches!(s.get(&client), Some((c, _)) if *c == conn) {
            s.remove(&client);
        }
    }

    /// After an unclean shutdown, every client that may hold promises is told
    /// to revalidate everything when it next connects.
    pub fn break_all_known_clients(&self) -> Result<usize, FsError> {
        let mut n = 0;
        for (k, _) in self.db.clients.iter().flatten() {
            if let Ok(client) = Uuid::from_slice(&k) {
                self.db.pending.insert(pending_key(client, BREAK_ALL), &[]).map_err(db_err)?;
                n += 1;
            }
        }
        self.db.callbacks.clear().map_err(db_err)?;
        Ok(n)
    }

    /// Breaks every promise on these objects except `except`'s (the client
    /// that made the change knows about it).
    pub async fn break_fids(&self, fids: &[Fid], except: Option<Uuid>) {
        let holders = self.take_holders(fids, except);
        self.send_breaks(holders).await;
    }

    /// Removes the promises on these objects (except `except`'s) and returns
    /// the live ones by holder: the breaks to send. Most changes touch objects
    /// nobody else holds, so this is cheap and usually empty.
    pub fn take_holders(&self, fids: &[Fid], except: Option<Uuid>) -> HashMap<Uuid, Vec<Fid>> {
        let now = now_secs();
        let mut per_client: HashMap<Uuid, Vec<Fid>> = HashMap::new();
        for &fid in fids {
            for (k, v) in self.db.callbacks.scan_prefix(fid.0.to_be_bytes()).flatten() {
                let Ok(client) = Uuid::from_slice(&k[8..]) else { continue };
                if Some(client) == except {
                    continue;
                }
                let _ = self.db.callbacks.remove(&k);
                if (be_u64(&v) as i64) < now {
                    continue; // expired: the client no longer trusts it anyway
                }
                per_client.entry(client).or_default().push(fid);
            }
        }
        per_client
    }

    /// Sends the breaks [`Callbacks::take_holders`] returned and waits a
    /// moment for each holder's acknowledgement.
    pub async fn send_breaks(&self, per_client: HashMap<Uuid, Vec<Fid>>) {
        // All holders at once; each gets a moment to acknowledge.
        let mut waits = tokio::task::JoinSet::new();
        for (client, fids) in per_client {
            let pusher = self.sessions.lock().unwrap().get(&client).map(|(_, p)| p.clone());
            let sent = pusher.map(|p| p.break_and_wait(fids.clone(), BREAK_ACK_WAIT));
            waits.spawn(async move {
                let outcome = match sent {
                    Some(f) => f.await,
                    None => BreakOutcome::Closed,
                };
                (client, fids, outcome)
            });
        }
        while let Some(Ok((client, fids, outcome))) = waits.join_next().await {
            if outcome != BreakOutcome::Closed {
                self.breaks_sent.fetch_add(fids.len() as u64, Ordering::Relaxed);
            }
            if outcome == BreakOutcome::Acked {
                tracing::debug!(%client, ?fids, "callback break acknowledged");
                continue;
            }
            // Away, or silent: it hears of it again when it reconnects.
            tracing::debug!(%client, ?fids, ?outcome, "break kept for the client's return");
            for fid in fids {
                let _ = self.db.pending.insert(pending_key(client, fid), &[]);
            }
        }
    }
}
