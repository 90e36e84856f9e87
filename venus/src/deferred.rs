//! Files created on the server when they are first closed.
//!
//! A new file is nearly always written and closed at once: a compiler's
//! output, say. Creating it on the server at `create(2)` and storing it at
//! close made two requests and two commits, each flushed to disk before its
//! reply. For a create without `O_EXCL` (see [`Venus::defer_create`]),
//! while connected and with the directory's listing current (so the name is
//! known to be free), venus instead makes the file locally,
//! under a local fid as an offline create would, and creates it on the
//! server at its first close, fsync or release, with its content (inline
//! when small, staged first when large): one commit.
//!
//! Until then only this client sees the name. Whatever else needs the
//! server to know the file first creates it there: a rename, link, unlink
//! or setattr of it, a rmdir of its directory. Disconnected by then, the
//! create goes to the log like an offline one. If another client took the
//! name meanwhile, or the server refuses the create, the content is kept
//! as a conflict, as reintegration would keep it.
//!
//! The record of a deferred create is its local node, marked
//! `awaiting_create` (persisted without a flush): after a crash of venus,
//! `recover` logs the creates of those that reached the disk.

use crate::cache::ContainerStamp;
use crate::cml::CmlOp;
use crate::conflicts::ConflictKind;
use crate::errors::{errno, Result};
use crate::fs::{promise_exp, Opening, Shared, Venus};
use common::proto::{CreateReq, NewContent, Reply, Request};
use common::rpc::store_request;
use common::{Fid, FileKind, FsError, VersionVector};
use std::fs::File;
use std::sync::Arc;

/// A file created locally and not yet on the server.
#[derive(Clone, Debug)]
pub struct Deferred {
    pub dir: Fid,
    pub name: String,
    pub mode: u32,
}

impl Venus {
    /// Makes `dir/name` locally if its server create can wait for the
    /// first close; `None` if it must be created now. An exclusive create
    /// (`O_EXCL`) never waits: it is how programs on different clients take
    /// a lock, and only the server can say who got it.
    pub(crate) fn defer_create(
        &self,
        dir: Fid,
        name: &str,
        mode: u32,
        exclusive: bool,
    ) -> Result<Option<(Fid, Opening<'_>)>> {
        if exclusive || dir.is_local() || !self.link.is_connected() || !self.cml.is_empty() {
            return Ok(None);
        }
        let free = self
            .cache
            .view(dir, |n| n.current() && n.entries.as_ref().is_some_and(|e| !e.contains_key(name)))
            .unwrap_or(false);
        if !free {
            return Ok(None);
        }
        let fid = self.new_local_fid()?;
        // Held before the sweep of orphans can see it in `deferred`.
        let opening = self.begin_open(fid);
        let mut node = self.local_node(fid, dir, name, FileKind::File, mode, 0);
        let f = File::create(self.cache.container_path(fid))?;
        node.cached = true;
        node.clean = Some(ContainerStamp::of(&f.metadata()?));
        node.awaiting_create = true;
        self.cache.insert(fid, node);
        self.cache.set_size(fid, 0);
        self.deferred.lock().unwrap().insert(fid, Deferred { dir, name: name.to_string(), mode });
        self.after_dir_change(dir, None, Some((name, fid, FileKind::File)), None);
        Ok(Some((fid, opening)))
    }

    pub(crate) fn is_deferred(&self, fid: Fid) -> bool {
        fid.is_local() && self.deferred.lock().unwrap().contains_key(&fid)
    }

    /// The deferred creates in `dir`, to show in a listing fetched afresh.
    pub(crate) fn deferred_in(&self, dir: Fid) -> Vec<(String, Fid)> {
        let deferred = self.deferred.lock().unwrap();
        deferred.iter().filter(|(_, d)| d.dir == dir).map(|(f, d)| (d.name.clone(), *f)).collect()
    }

    /// Creates `fid` on the server now if its create was deferred (for a
    /// change that needs the server to know it).
    pub(crate) fn settle_deferred(&self, fid: Fid) -> Result<()> {
        let fid = self.resolve(fid);
        if !self.is_deferred(fid) {
            return Ok(());
        }
        self.rt.block_on(async {
            let _g = self.stripe(fid).lock().await;
            self.create_deferred(fid).await.map(|_| ())
        })
    }

    /// Creates the entry `dir/name` on the server now if it is a deferred create.
    pub(crate) fn settle_deferred_name(&self, dir: Fid, name: &str) -> Result<()> {
        let dir = self.resolve(dir);
        let found = self.deferred.lock().unwrap().iter().find(|(_, d)| d.dir == dir && d.name == name).map(|(f, _)| *f);
        match found {
            Some(fid) => self.settle_deferred(fid),
            None => Ok(()),
        }
    }

    /// Creates every deferred file in `dir` on the server (before the
    /// directory is removed, so the server sees it is not empty).
    pub(crate) fn settle_deferred_in(&self, dir: Fid) -> Result<()> {
        for (_, fid) in self.deferred_in(self.resolve(dir)) {
            self.settle_deferred(fid)?;
        }
        Ok(())
    }

    /// Creates a deferred file on the server with its content; returns the
    /// fid it has now (the server's, or still the local one
    /// when the create went to the log). The caller holds `local`'s stripe.
    pub(crate) async fn create_deferred(&self, local: Fid) -> Result<Fid> {
        let Some(d) = self.deferred.lock().unwrap().get(&local).cloned() else {
            return Ok(self.resolve(local));
        };
        if !self.link.is_connected() || !self.cml.is_empty() {
            self.log_deferred(local, &d, None)?;
            return Ok(local);
        }
        let container = Arc::new(File::open(self.cache.container_path(local))?);
        let sent = ContainerStamp::of(&container.metadata()?);
        // Large content is staged first, as for a store.
        let staged = store_request(&self.client, local, VersionVector::new(), container, Some(sent.mtime), None).await;
        let staged = match staged {
            Ok(s) => s,
            Err(e) if e.is_transport() => {
                self.link.lost(format!("staging a new file failed: {e}"));
                self.log_deferred(local, &d, None)?;
                return Ok(local);
            }
            Err(e) => return Err(e.into()),
        };
        let content = Some(NewContent { data: staged.data, size: staged.size, mtime: sent.mtime });
        let req = CreateReq { dir: d.dir, name: d.name.clone(), mode: d.mode, exclusive: true, content };
        let seq = self.client.allocate_sequence();
        let result = self.client.call_with_seq(seq, Request::Create(req)).await;
        if !matches!(&result, Err(e) if e.is_transport()) {
            self.client.unhold(seq);
        }
        match result {
            Ok(Reply::Create(e)) => {
                // A listing fetched before the create may lack the file,
                // and it is no longer merged in from here: no promise for it.
                self.bump_gen(d.dir);
                self.deferred.lock().unwrap().remove(&local);
                let server = e.attr.fid;
                self.adopt_server_fid(local, server, &e.attr, promise_exp(e.promise))?;
                self.after_dir_change(d.dir, Some(e.dir), None, None);
                // In step with the server only if nobody wrote since the
                // content was read. The container was linked to its new
                // name since: its ctime moved.
                let now = std::fs::metadata(self.cache.container_path(server)).map(|m| ContainerStamp::of(&m)).ok();
                let in_step = now.is_some_and(|n| n.same_content(&sent));
                if !in_step {
                    tracing::debug!(%server, ?sent, ?now, "a new file changed while it was created");
                }
                let synced = if in_step { now } else { None };
                self.cache.update(server, |n| {
                    n.dirty = !in_step;
                    n.clean = synced;
                    n.awaiting_create = false;
                });
                if let Some((_, shared)) = self.opened.lock().unwrap().get(&server) {
                    *shared.synced.lock().unwrap() = synced.unwrap_or_default();
                }
                Ok(server)
            }
            Ok(_) => Err(errno(libc::EIO, "reply of the wrong kind")),
            Err(e) if e.is_transport() => {
                // The server may have made it: the log resends the create
                // under the same transaction id, so it happens at most once.
                self.link.lost(format!("a create failed: {e}"));
                self.log_deferred(local, &d, Some(seq))?;
                Ok(local)
            }
            Err(common::rpc::RpcError::Fs(e)) => {
                self.refuse_deferred(local, &d, e).await?;
                Err(refused_error())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A deferred create goes to the log (disconnected, or the log holds
    /// older changes that must go first); the close that follows logs the
    /// content like any offline store.
    fn log_deferred(&self, local: Fid, d: &Deferred, seq: Option<u64>) -> Result<()> {
        self.log_append(CmlOp::Create { dir: d.dir, name: d.name.clone(), fid: local, mode: d.mode }, seq)?;
        self.cache.update(local, |n| n.awaiting_create = false);
        self.deferred.lock().unwrap().remove(&local);
        self.cache.update(d.dir, |n| n.dirty = true);
        self.cache.flush()
    }

    /// The server refused a deferred create: the content is kept as a
    /// conflict and the local file is forgotten.
    async fn refuse_deferred(&self, local: Fid, d: &Deferred, e: FsError) -> Result<()> {
        let path = self.path_in(d.dir, &d.name);
        let server = match self
            .remote(self.client.lookup(common::proto::LookupReq { dir: d.dir, name: d.name.clone() }))
            .await
        {
            Ok(r) => Some(r.attr),
            Err(_) => None,
        };
        let container = File::open(self.cache.container_path(local)).ok();
        let kind = if e == FsError::Exists { ConflictKind::CreateCreate } else { ConflictKind::Refused };
        tracing::warn!(%path, "the server refused a file created on close: {e}; kept as a conflict");
        let id = self.record_conflict(kind, &path, server, container.as_ref(), None, e.to_string())?;
        // Handles still open keep writing to the container: later closes
        // copy it into the conflict again (`keep_refused`).
        self.refused.lock().unwrap().insert(local, id);
        if let (Some((_, shared)), Some(c)) = (self.opened.lock().unwrap().get(&local), container.as_ref()) {
            *shared.synced.lock().unwrap() = ContainerStamp::of(&c.metadata()?);
        }
        self.deferred.lock().unwrap().remove(&local);
        self.cache.remove(local);
        // The listing showed the local file: it is fetched afresh.
        self.cache.update(d.dir, |n| {
            n.entries = None;
            n.valid = false;
        });
        let _ = std::fs::remove_file(self.cache.container_path(local));
        // The kernel may still map the name to the local file. Sent from a
        // thread of its own: this runs inside a request (a close, an
        // fsync) and an invalidation may wait for the directory's lock.
        if let Some(notifier) = self.notifier.get().cloned() {
            let (dir, name) = (d.dir, d.name.clone());
            std::thread::spawn(move || {
                let _ = notifier.inval_entry(fuser::INodeNo(dir.0), std::ffi::OsStr::new(&name));
            });
        }
        Ok(())
    }

    /// Deferred files no handle holds any more (their last close failed
    /// with the file still deferred): created now, while connected.
    pub(crate) async fn create_orphaned_deferred(&self) {
        let fids: Vec<Fid> = self.deferred.lock().unwrap().keys().copied().collect();
        for fid in fids.into_iter().filter(|f| !self.is_open_or_opening(*f)) {
            let _g = self.stripe(fid).lock().await;
            // Asked again under the stripe, which an open takes before it
            // registers: one that began meanwhile keeps the file.
            if self.is_open_or_opening(fid) {
                continue;
            }
            if let Err(e) = self.create_deferred(fid).await {
                tracing::warn!(%fid, "creating a closed file on the server failed: {e}");
            }
        }
    }

    /// The conflict a refused deferred create became, while handles of it are open.
    pub(crate) fn refused_conflict(&self, fid: Fid) -> Option<u64> {
        if !fid.is_local() {
            return None;
        }
        self.refused.lock().unwrap().get(&fid).copied()
    }

    /// A close of a file whose create was refused: what was written since
    /// goes into the conflict's copy, and the close fails again.
    pub(crate) fn keep_refused(&self, id: u64, shared: &Shared) -> Result<()> {
        let now = ContainerStamp::of(&shared.file.metadata()?);
        let mut synced = shared.synced.lock().unwrap();
        if !synced.same_content(&now) {
            self.conflicts.replace_local(id, &shared.file)?;
            *synced = now;
        }
        Err(refused_error())
    }

    /// After a crash: files still awaiting their create are logged now,
    /// content and all. (One whose create the server ran before the crash
    /// is recognised at reintegration: `Venus::is_own_create`.)
    pub(crate) fn log_interrupted_creates(&self) -> Result<usize> {
        let mut n = 0;
        for fid in self.cache.fids_where(|n| n.awaiting_create) {
            let Some(node) = self.cache.get(fid) else { continue };
            self.cache.update(fid, |n| n.awaiting_create = false);
            if !fid.is_local() || node.attr.nlink == 0 || node.attr.kind != FileKind::File {
                continue;
            }
            let Some((dir, name)) = node.parent.clone() else { continue };
            tracing::info!(%fid, %name, "logging a file whose create a crash cut short");
            self.log_append(CmlOp::Create { dir, name, fid, mode: node.attr.mode }, None)?;
            self.log_append(CmlOp::Store { fid, base: VersionVector::new(), mode: None }, None)?;
            self.cache.update(dir, |n| n.dirty = true);
            n += 1;
        }
        Ok(n)
    }
}

fn refused_error() -> crate::errors::VenusError {
    errno(libc::EIO, "create refused: the file is kept as a conflict (see venus conflicts list)")
}
