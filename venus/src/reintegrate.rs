//! Reintegration: replaying the modification log on the server.
//!
//! Records go in order, in batches (one `reintegrate` call carries up to a
//! thousand records or 2 MiB of inline data). Each record has its own
//! transaction id, assigned and persisted before it is first sent, so a
//! reintegration cut short by a crash of either side, or of the network, is
//! simply resumed: what the server already ran is answered from its reply
//! cache and runs once. Records the server refuses become conflicts with both
//! versions kept; everything else goes through.

use crate::cache::ContainerStamp;
use crate::cml::{CmlOp, Record};
use crate::conflicts::{Conflict, ConflictKind, Side};
use crate::errors::{Result, VenusError};
use crate::fs::{promise_exp, Venus};
use common::proto::*;
use common::rpc::store_request;
use common::{Attr, Fid, FsError, VersionVector};
use std::collections::HashSet;
use std::fs::File;
use std::sync::Arc;

const BATCH_RECORDS: usize = 1000;
const BATCH_BYTES: usize = 2 << 20;
/// Files staged (stores over the inline limit) per batch.
const BATCH_STAGED: usize = 32;

#[derive(Default)]
struct Batch {
    requests: Vec<ReintegrateRecord>,
    /// The records sent, with their transaction ids.
    sent: Vec<Record>,
    /// Stage handles of the batch's large stores.
    stages: Vec<u64>,
}

/// What a reintegration did.
#[derive(Debug, Default)]
pub struct Summary {
    pub applied: usize,
    pub conflicts: usize,
}

impl Venus {
    /// Replays the whole log; new records logged meanwhile are replayed too.
    /// Fails with `Offline` if the server goes away (the rest stays logged).
    pub async fn reintegrate(&self) -> Result<Summary> {
        let mut summary = Summary::default();
        let total = self.cml.len();
        if total > 0 {
            tracing::info!(records = total, "reintegrating the modification log");
        }
        let mut touched_dirs = HashSet::new();
        let mut retries = 0;
        loop {
            let batch = self.next_batch().await?;
            if batch.sent.is_empty() {
                break;
            }
            self.cache.flush()?;
            let reply = self.remote(self.client.reintegrate(ReintegrateReq { records: batch.requests })).await?;
            // Stage handles of records the server did not consume (answered
            // from its reply cache) would count against this client's limit
            // until they idle out.
            self.release_stages(&batch.stages).await;
            let mut failed_locals: HashSet<Fid> = HashSet::new();
            // Local fids the server could not know in this batch (a directory
            // merged into an existing one): records naming them ran without
            // effect and are sent again, with the server's fid.
            let mut resend_locals: HashSet<Fid> = HashSet::new();
            let mut kept = 0;
            for (rec, result) in batch.sent.iter().zip(reply.results) {
                // Every directory an offline change touched is listed afresh
                // afterwards: its cached listing holds the offline view.
                match &rec.op {
                    CmlOp::Create { dir, .. }
                    | CmlOp::Mkdir { dir, .. }
                    | CmlOp::Symlink { dir, .. }
                    | CmlOp::Link { dir, .. }
                    | CmlOp::Remove { dir, .. }
                    | CmlOp::Rmdir { dir, .. } => {
                        touched_dirs.insert(*dir);
                    }
                    CmlOp::Rename { from_dir, to_dir, .. } => {
                        touched_dirs.insert(*from_dir);
                        touched_dirs.insert(*to_dir);
                    }
                    _ => {}
                }
                if !self.cml.contains(rec.id) {
                    // Dropped with a directory whose creation failed (its
                    // content is kept in that conflict).
                    continue;
                }
                if rec.op.fids().iter().any(|f| failed_locals.contains(f)) {
                    // Its object's creation became a conflict, which kept its content.
                    self.finish(rec)?;
                    continue;
                }
                if rec.op.fids().iter().any(|f| resend_locals.contains(f)) {
                    if let CmlOp::Create { fid, .. } | CmlOp::Mkdir { fid, .. } | CmlOp::Symlink { fid, .. } = &rec.op {
                        resend_locals.insert(*fid);
                    }
                    self.cml.clear_seq(rec.id)?;
                    if let Some(s) = rec.seq {
                        self.client.unhold(s);
                    }
                    kept += 1;
                    continue;
                }
                match result {
                    Ok(reply) => {
                        // A store's result under the file's stripe: a
                        // close-time store reads its base there before
                        // logging, and must see either the old base (and be
                        // rebased) or the new one. A create's renumbering
                        // likewise, under the new object's stripe: a close
                        // of it decides and logs its store under that
                        // stripe, so it logs either before (and the record
                        // is remapped and rebased) or after, under the
                        // server fid and the new base.
                        let created = match &rec.op {
                            CmlOp::Create { dir, name, fid, .. }
                            | CmlOp::Mkdir { dir, name, fid, .. }
                            | CmlOp::Symlink { dir, name, fid, .. } => Some((*dir, name, *fid)),
                            _ => None,
                        };
                        let g = if matches!(rec.op, CmlOp::Store { .. } | CmlOp::SetAttr { .. }) {
                            Some(self.stripe(self.resolve(rec.op.subject())).lock().await)
                        } else if let Some((_, _, local)) = created {
                            Some(self.stripe(local).lock().await)
                        } else {
                            None
                        };
                        self.applied(rec, reply)?;
                        drop(g);
                        if let Some((dir, name, _)) = created {
                            // Not under a stripe: an invalidation may wait
                            // for the directory's lock, held by a request
                            // that waits for a stripe.
                            tokio::task::block_in_place(|| self.invalidate_kernel_entry(self.resolve(dir), name));
                        }
                        summary.applied += 1;
                        self.finish(rec)?;
                    }
                    Err(FsError::Stale) if matches!(rec.op, CmlOp::Store { .. }) && retries < 3 => {
                        // Staged data lost to a server restart: stage again.
                        kept += 1;
                    }
                    Err(e) => {
                        match self.refused(rec, e, &mut touched_dirs).await? {
                            Refusal::Conflict => summary.conflicts += 1,
                            Refusal::Merged(local) => {
                                resend_locals.insert(local);
                                summary.applied += 1;
                            }
                            Refusal::Harmless => summary.applied += 1,
                            Refusal::CreateFailed(local) => {
                                failed_locals.insert(local);
                                summary.conflicts += 1;
                            }
                        }
                        self.finish(rec)?;
                    }
                }
            }
            // Records resent because of others (a merged directory, data
            // staged again) are normal; only batches that get nowhere count.
            if kept > 0 && kept == batch.sent.len() {
                retries += 1;
                if retries > 5 {
                    return Err(crate::errors::errno(libc::EIO, "reintegration keeps failing on the same records"));
                }
            }
            // Durable before the containers of adopted objects lose their
            // local names (see `Cache::renumber`).
            self.cache.flush()?;
            let left = self.cml.len();
            if total > 200 {
                tracing::info!(done = total.saturating_sub(left), total, "reintegration progress");
            }
        }
        // Directories changed offline (even by changes the log cancelled
        // out) are listed afresh too.
        touched_dirs.extend(self.cache.fids_where(|n| n.dirty && n.attr.kind == common::FileKind::Dir));
        if !touched_dirs.is_empty() {
            // A directory named by a change logged meanwhile keeps its
            // listing: it holds that change, which the server has not seen
            // yet (the next pass lists it afresh).
            let dirs: Vec<Fid> = touched_dirs
                .into_iter()
                .map(|d| self.resolve(d))
                .filter(|d| !d.is_local())
                .filter(|d| !self.cml.any(|r| r.op.fids().iter().any(|f| self.resolve(*f) == *d)))
                .collect();
            for d in &dirs {
                self.cache.update(*d, |n| {
                    n.valid = false;
                    n.entries = None;
                    n.dirty = false;
                });
            }
            // Kernel invalidations may wait on inode locks held by requests
            // that need a runtime worker: never block a worker with them.
            tokio::task::block_in_place(|| self.on_break(&dirs));
        }
        if summary.applied + summary.conflicts > 0 {
            tracing::info!(applied = summary.applied, conflicts = summary.conflicts, "reintegration complete");
        }
        Ok(summary)
    }

    /// The next records to send, each with its transaction id assigned and
    /// persisted. A batch ends at its record or byte limit, at its limit of
    /// staged files (the server holds a bounded number of stage handles per
    /// client), and before a rename that replaces an object an earlier
    /// record of the batch changes (its base is only known once that ran).
    async fn next_batch(&self) -> Result<Batch> {
        let mut batch = Batch::default();
        let mut bytes = 0;
        let mut subjects = HashSet::new();
        for rec in self.cml.records_from(0, BATCH_RECORDS) {
            if bytes >= BATCH_BYTES || batch.stages.len() >= BATCH_STAGED {
                break;
            }
            // Claimed before its request is built (which may wait): a change
            // logged meanwhile becomes a new record instead of rewriting this one.
            let Some(rec) = self.cml.claim(rec.id, || self.client.allocate_sequence())? else { continue };
            let seq = rec.seq.expect("claimed records have a transaction id");
            if let CmlOp::Rename { replaced: Some(r), replaced_base: Some(_), .. } = &rec.op {
                if subjects.contains(&self.resolve(*r)) {
                    break;
                }
            }
            let (req, creates, payload) = match self.request_for(&rec).await {
                Ok(x) => x,
                Err(VenusError::Io(e))
                    if matches!(rec.op, CmlOp::Store { .. }) && e.kind() == std::io::ErrorKind::NotFound =>
                {
                    self.content_missing(&rec)?;
                    continue;
                }
                Err(e) => {
                    self.release_stages(&batch.stages).await;
                    return Err(e);
                }
            };
            if let Request::Store(StoreReq { data: StoreData::Staged(h), .. }) = &req {
                batch.stages.push(*h);
            }
            bytes += payload;
            subjects.insert(self.resolve(rec.op.subject()));
            batch.requests.push(ReintegrateRecord { seq, creates, req });
            batch.sent.push(rec);
        }
        Ok(batch)
    }

    async fn release_stages(&self, stages: &[u64]) {
        let mut releases = tokio::task::JoinSet::new();
        for &handle in stages {
            let client = self.client.clone();
            releases.spawn(async move { client.release(ReleaseReq { handle }).await });
        }
        while releases.join_next().await.is_some() {}
    }

    /// A logged store whose content is not in the cache any more (it cannot
    /// happen short of someone deleting cache files): it is reported as a
    /// conflict with nothing local to keep, rather than blocking the log.
    fn content_missing(&self, rec: &Record) -> Result<()> {
        let fid = self.resolve(rec.op.subject());
        let path = self.cache.path_of(fid);
        tracing::error!(%fid, %path, "the cached content of a logged store is missing: the change is lost");
        self.record_conflict(
            ConflictKind::Refused,
            &path,
            None,
            None,
            None,
            "the local copy of this file was missing from the cache at reintegration".into(),
        )?;
        self.finish(rec)
    }

    fn finish(&self, rec: &Record) -> Result<()> {
        self.cml.done(rec.id)?;
        if let Some(s) = rec.seq {
            self.client.unhold(s);
        }
        Ok(())
    }

    /// The request a record sends, the local fid it creates, and its inline bytes.
    async fn request_for(&self, rec: &Record) -> Result<(Request, Option<Fid>, usize)> {
        Ok(match &rec.op {
            CmlOp::Store { fid, base, mode } => {
                let file = Arc::new(File::open(self.cache.container_path(*fid))?);
                let mtime = Some(ContainerStamp::of(&file.metadata()?).mtime);
                let req = self.remote(store_request(&self.client, *fid, base.clone(), file, mtime, *mode)).await?;
                let inline = match &req.data {
                    StoreData::Inline(d) => d.len(),
                    StoreData::Staged(_) => 0,
                };
                (Request::Store(req), None, inline)
            }
            CmlOp::Create { dir, name, fid, mode } => (
                Request::Create(CreateReq {
                    dir: *dir,
                    name: name.clone(),
                    mode: *mode,
                    exclusive: true,
                    content: None,
                }),
                Some(*fid),
                0,
            ),
            CmlOp::Mkdir { dir, name, fid, mode } => {
                (Request::Mkdir(MkdirReq { dir: *dir, name: name.clone(), mode: *mode }), Some(*fid), 0)
            }
            CmlOp::Symlink { dir, name, fid, target } => {
                (Request::Symlink(SymlinkReq { dir: *dir, name: name.clone(), target: target.clone() }), Some(*fid), 0)
            }
            CmlOp::Link { fid, dir, name } => {
                (Request::Link(LinkReq { fid: *fid, dir: *dir, name: name.clone() }), None, 0)
            }
            CmlOp::Remove { dir, name, base, .. } => {
                (Request::Remove(RemoveReq { dir: *dir, name: name.clone(), base: base.clone() }), None, 0)
            }
            CmlOp::Rmdir { dir, name, .. } => (Request::Rmdir(RmdirReq { dir: *dir, name: name.clone() }), None, 0),
            CmlOp::Rename { from_dir, from, to_dir, to, replaced, replaced_base, .. } => (
                Request::Rename(RenameReq {
                    from_dir: *from_dir,
                    from_name: from.clone(),
                    to_dir: *to_dir,
                    to_name: to.clone(),
                    // A rename that replaced nothing offline must not replace
                    // something created on the server meanwhile, nor one that
                    // replaced a file replace a newer version of it.
                    no_replace: replaced.is_none(),
                    replaced_base: replaced_base.clone(),
                }),
                None,
                0,
            ),
            CmlOp::SetAttr { fid, set, base } => {
                (Request::SetAttr(SetAttrReq { fid: *fid, set: set.clone(), base: base.clone() }), None, 0)
            }
        })
    }

    /// A record went through: the cache learns the server's result.
    fn applied(&self, rec: &Record, reply: Reply) -> Result<()> {
        match (&rec.op, reply) {
            (CmlOp::Store { fid, base, .. }, Reply::Store(e)) => {
                let fid = self.resolve(*fid);
                // Open handles may be based on the version the node had (a
                // file created offline has its create's version by now).
                let node_version = self.cache.view(fid, |n| n.attr.version.clone());
                // Dirty only while later content of it is logged.
                let still_logged =
                    self.cml.any(|r| r.id != rec.id && r.op.subject() == fid && matches!(r.op, CmlOp::Store { .. }));
                let stamp = std::fs::metadata(self.cache.container_path(fid)).ok().map(|m| ContainerStamp::of(&m));
                let promise = promise_exp(e.promise);
                let version = e.attr.version.clone();
                self.cache.update(fid, |n| {
                    n.attr = e.attr;
                    if let Some(exp) = promise {
                        n.valid = true;
                        n.expires = exp;
                    }
                    n.cached = true;
                    n.dirty = still_logged;
                    n.clean = if still_logged { None } else { stamp };
                });
                self.rebase(fid, base, &version);
                if let Some(v) = node_version.filter(|v| v != base) {
                    self.rebase(fid, &v, &version);
                }
            }
            (CmlOp::Create { fid: local, .. }, Reply::Create(e))
            | (CmlOp::Mkdir { fid: local, .. }, Reply::Mkdir(e))
            | (CmlOp::Symlink { fid: local, .. }, Reply::Symlink(e)) => {
                // (The kernel's entry is invalidated by the caller, once
                // the stripe is released.)
                let server = e.attr.fid;
                self.adopt_server_fid(*local, server, &e.attr, promise_exp(e.promise))?;
            }
            (CmlOp::Link { fid, .. }, Reply::Link(e)) => {
                let fid = self.resolve(*fid);
                let version = e.attr.version.clone();
                let before = self.cache.view(fid, |n| n.attr.version.clone()).unwrap_or_default();
                self.cache.update(fid, |n| {
                    n.attr.version = version.clone();
                    n.attr.nlink = e.attr.nlink;
                });
                self.rebase(fid, &before, &version);
            }
            (CmlOp::Rename { fid, .. }, Reply::Rename(r)) => {
                let fid = self.resolve(*fid);
                self.cache.update(fid, |n| n.attr.ctime = r.moved.ctime);
            }
            (CmlOp::SetAttr { fid, base, set }, Reply::SetAttr(e)) => {
                let fid = self.resolve(*fid);
                let version = e.attr.version.clone();
                // A truncation made the file dirty; once the server has it,
                // the container is in step again unless a store is logged.
                let content_logged =
                    self.cml.any(|r| r.id != rec.id && r.op.subject() == fid && matches!(r.op, CmlOp::Store { .. }));
                let container = std::fs::metadata(self.cache.container_path(fid)).ok();
                self.cache.update(fid, |n| {
                    let in_step = set.size.is_some()
                        && !content_logged
                        && container.as_ref().is_some_and(|m| m.len() == e.attr.size);
                    if in_step {
                        n.dirty = false;
                        n.clean = container.as_ref().map(ContainerStamp::of);
                    }
                    if !n.dirty {
                        n.attr = e.attr.clone();
                    } else {
                        n.attr.version = version.clone();
                    }
                });
                if let Some(b) = base {
                    self.rebase(fid, b, &version);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A local fid got its server fid: cache, log, open files and the
    /// kernel's inode numbers follow.
    pub(crate) fn adopt_server_fid(&self, local: Fid, server: Fid, attr: &Attr, promise: Option<i64>) -> Result<()> {
        let still_logged = self.cml.any(|r| r.op.fids().contains(&local) && r.op.kind() == "store");
        // A record resent after a crash may already carry the server's fid.
        let renumber = local != server;
        if renumber {
            // The alias goes first: after a crash at any later point, start-up
            // finishes the renumbering from it (`Venus::recover`).
            self.add_alias(local, server)?;
            self.cache.renumber(local, server);
            self.failpoint("renumbered");
        }
        let version = attr.version.clone();
        self.cache.update(server, |n| {
            let (size, mtime) = (n.attr.size, n.attr.mtime);
            n.attr = attr.clone();
            if still_logged {
                n.attr.size = size;
                n.attr.mtime = mtime;
            }
            n.valid = promise.is_some();
            n.expires = promise.unwrap_or(0);
            n.dirty = still_logged;
            if !still_logged && n.cached {
                n.clean = std::fs::metadata(self.cache.container_path(server)).ok().map(|m| ContainerStamp::of(&m));
            }
        });
        if renumber {
            self.cml.remap(local, server)?;
        }
        self.rebase(server, &VersionVector::new(), &version);
        let mut opened = self.opened.lock().unwrap();
        if let Some(entry) = opened.remove(&local) {
            *entry.1.fid.lock().unwrap() = server;
            *entry.1.base.lock().unwrap() = version;
            opened.insert(server, entry);
        }
        Ok(())
    }

    /// Later records of `fid` based on `before` are based on `after` now:
    /// the change between them was this client's own.
    fn rebase(&self, fid: Fid, before: &VersionVector, after: &VersionVector) {
        let _ = self.cml.rebase(fid, before, after);
        for s in self.open_shared() {
            if s.fid() == fid {
                let mut b = s.base.lock().unwrap();
                if *b == *before {
                    *b = after.clone();
                }
            }
        }
    }

    /// A record the server refused: a conflict with both versions kept, or
    /// nothing to do when the server already has the intended effect.
    async fn refused(&self, rec: &Record, err: FsError, dirs: &mut HashSet<Fid>) -> Result<Refusal> {
        if let (CmlOp::Create { dir, name, fid, .. }, FsError::Exists) = (&rec.op, &err) {
            let dir = self.resolve(*dir);
            if let Some(server) = self.server_attr(dir, name).await.filter(|a| self.is_own_create(*fid, a)) {
                // This client's own create, whose reply a crash of venus lost
                // (a file created on close, logged again at the restart).
                tracing::info!(path = %self.path_in(dir, name), "the server already has this create");
                // Under the file's stripe, as in the results loop.
                let _g = self.stripe(*fid).lock().await;
                self.adopt_server_fid(*fid, server.fid, &server, None)?;
                dirs.insert(dir);
                return Ok(Refusal::Harmless);
            }
        }
        let detail = err.to_string();
        // The kernel may remember this name as the offline change left it
        // (a removed name as absent, say): the server's version must show.
        let names: Vec<(Fid, String)> = match &rec.op {
            CmlOp::Create { dir, name, .. }
            | CmlOp::Mkdir { dir, name, .. }
            | CmlOp::Symlink { dir, name, .. }
            | CmlOp::Link { dir, name, .. }
            | CmlOp::Remove { dir, name, .. }
            | CmlOp::Rmdir { dir, name, .. } => vec![(*dir, name.clone())],
            CmlOp::Rename { from_dir, from, to_dir, to, .. } => vec![(*from_dir, from.clone()), (*to_dir, to.clone())],
            _ => vec![],
        };
        for (dir, name) in names {
            let dir = self.resolve(dir);
            tokio::task::block_in_place(|| self.invalidate_kernel_entry(dir, &name));
        }
        match (&rec.op, err) {
            (CmlOp::Store { fid, base, .. }, FsError::Conflict(a))
                if self.holds_content_of(self.resolve(*fid), base, &a) =>
            {
                // An earlier attempt ran before a crash lost its reply: the
                // server has exactly this content.
                let fid = self.resolve(*fid);
                let version = a.version.clone();
                self.cache.update(fid, |n| {
                    n.attr = *a;
                    n.dirty = false;
                    n.clean = std::fs::metadata(self.cache.container_path(fid)).ok().map(|m| ContainerStamp::of(&m));
                });
                self.rebase(fid, base, &version);
                Ok(Refusal::Harmless)
            }
            (CmlOp::Store { fid, .. }, e) => {
                let fid = self.resolve(*fid);
                let path = self.cache.path_of(fid);
                let container = File::open(self.cache.container_path(fid)).ok();
                let (kind, server) = match e {
                    FsError::Conflict(a) => (ConflictKind::UpdateUpdate, Some(*a)),
                    FsError::Stale | FsError::NotFound => (ConflictKind::UpdateRemove, None),
                    _ => (ConflictKind::Refused, None),
                };
                self.record_conflict(kind, &path, server, container.as_ref(), None, detail)?;
                // Later logged changes of the file are in the kept copy (the
                // container is one): they would only conflict again.
                for later in self.cml.records() {
                    let changes_it = matches!(later.op, CmlOp::Store { .. } | CmlOp::SetAttr { .. });
                    if later.id != rec.id && changes_it && self.resolve(later.op.subject()) == fid {
                        self.finish(&later)?;
                    }
                }
                // The namespace now shows the server's side.
                if let Some((p, _)) = self.cache.view(fid, |n| n.parent.clone()).flatten() {
                    dirs.insert(p);
                }
                self.cache.remove(fid);
                dirs.insert(fid);
                Ok(Refusal::Conflict)
            }
            (CmlOp::Create { dir, name, fid, .. } | CmlOp::Symlink { dir, name, fid, .. }, e) => {
                let path = self.path_in(*dir, name);
                let server = self.server_attr(self.resolve(*dir), name).await;
                let container = File::open(self.cache.container_path(*fid)).ok();
                let kind = if e == FsError::Exists { ConflictKind::CreateCreate } else { ConflictKind::Refused };
                self.record_conflict(kind, &path, server, container.as_ref(), None, detail)?;
                self.drop_local_tree(*fid, dirs)?;
                dirs.insert(self.resolve(*dir));
                Ok(Refusal::CreateFailed(*fid))
            }
            (CmlOp::Mkdir { dir, name, fid, .. }, e) => {
                let dir = self.resolve(*dir);
                if e == FsError::Exists {
                    if let Some(a) = self.server_attr(dir, name).await.filter(|a| a.kind == common::FileKind::Dir) {
                        // Both sides made the directory: they become one.
                        tracing::info!(path = %self.path_in(dir, name), "directory created on both sides: merged");
                        self.adopt_server_fid(*fid, a.fid, &a, None)?;
                        self.cache.update(a.fid, |n| n.valid = false);
                        dirs.insert(dir);
                        return Ok(Refusal::Merged(*fid));
                    }
                }
                let path = self.path_in(dir, name);
                let server = self.server_attr(dir, name).await;
                self.record_conflict(ConflictKind::CreateCreate, &path, server, None, None, detail)?;
                self.drop_local_tree(*fid, dirs)?;
                dirs.insert(dir);
                Ok(Refusal::CreateFailed(*fid))
            }
            (CmlOp::Remove { .. } | CmlOp::Rmdir { .. }, FsError::NotFound | FsError::Stale) => Ok(Refusal::Harmless),
            (CmlOp::Remove { dir, name, .. }, e) => {
                let dir = self.resolve(*dir);
                let path = self.path_in(dir, name);
                let server = match e {
                    FsError::Conflict(a) => Some(*a),
                    _ => self.server_attr(dir, name).await,
                };
                let kind = if server.is_some() { ConflictKind::RemoveUpdate } else { ConflictKind::Refused };
                self.record_conflict(kind, &path, server, None, None, detail)?;
                dirs.insert(dir);
                Ok(Refusal::Conflict)
            }
            (CmlOp::Rmdir { dir, name, .. }, _) => {
                let dir = self.resolve(*dir);
                let path = self.path_in(dir, name);
                let server = self.server_attr(dir, name).await;
                self.record_conflict(ConflictKind::RemoveUpdate, &path, server, None, None, detail)?;
                dirs.insert(dir);
                Ok(Refusal::Conflict)
            }
            (CmlOp::Rename { from_dir, from, to_dir, to, .. }, e) => {
                let (from_dir, to_dir) = (self.resolve(*from_dir), self.resolve(*to_dir));
                let path = self.path_in(to_dir, to);
                let server = self.server_attr(to_dir, to).await;
                // Exists: the name was taken meanwhile; Conflict: the file the
                // rename replaced changed on the server. Either way both stay.
                let kind = match e {
                    FsError::Exists | FsError::Conflict(_) => ConflictKind::RenameCollision,
                    _ => ConflictKind::Refused,
                };
                self.record_conflict(kind, &path, server, None, Some(self.path_in(from_dir, from)), detail)?;
                dirs.insert(from_dir);
                dirs.insert(to_dir);
                Ok(Refusal::Conflict)
            }
            (CmlOp::Link { dir, name, .. }, e) => {
                let dir = self.resolve(*dir);
                let kind = if e == FsError::Exists { ConflictKind::CreateCreate } else { ConflictKind::Refused };
                let server = self.server_attr(dir, name).await;
                self.record_conflict(kind, &self.path_in(dir, name), server, None, None, detail)?;
                dirs.insert(dir);
                Ok(Refusal::Conflict)
            }
            (CmlOp::SetAttr { fid, .. }, e) => {
                let fid = self.resolve(*fid);
                let server = if let FsError::Conflict(a) = e { Some(*a) } else { None };
                self.record_conflict(ConflictKind::Refused, &self.cache.path_of(fid), server, None, None, detail)?;
                self.cache.update(fid, |n| n.valid = false);
                dirs.insert(fid);
                Ok(Refusal::Conflict)
            }
        }
    }

    /// Forgets an object created offline whose creation was refused, and
    /// everything logged below it; files among them are kept as conflicts.
    fn drop_local_tree(&self, local: Fid, dirs: &mut HashSet<Fid>) -> Result<()> {
        for rec in self.cml.records() {
            let fids = rec.op.fids();
            if !fids.contains(&local) && !fids.iter().any(|f| f.is_local() && self.cache.is_within(*f, local)) {
                continue;
            }
            if let CmlOp::Create { dir, name, fid, .. } = &rec.op {
                if *fid != local {
                    let path = self.path_in(*dir, name);
                    let container = File::open(self.cache.container_path(*fid)).ok();
                    self.record_conflict(
                        ConflictKind::CreateCreate,
                        &path,
                        None,
                        container.as_ref(),
                        None,
                        "its directory could not be created on the server".into(),
                    )?;
                }
            }
            // Not sent yet (or failing with the rest): finishing it is safe,
            // its content lives on in the conflict.
            if rec.op.subject() != local {
                self.finish(&rec)?;
            }
        }
        dirs.insert(local);
        self.cache.remove(local);
        Ok(())
    }

    /// Whether the server's file is the local file `local` as this client
    /// created it: nobody else changed it, and it has the container's size
    /// and mtime (a create on close carries both).
    fn is_own_create(&self, local: Fid, server: &Attr) -> bool {
        let v = &server.version;
        let ours = v.total() > 0 && v.get(&self.client.id()) == v.total();
        ours && server.kind == common::FileKind::File
            && std::fs::metadata(self.cache.container_path(local))
                .is_ok_and(|m| (m.len(), ContainerStamp::of(&m).mtime) == (server.size, server.mtime))
    }

    /// Whether the server's version is this client's own store of the
    /// container's content on `base` (see `own_store_ran`).
    fn holds_content_of(&self, fid: Fid, base: &VersionVector, server: &Attr) -> bool {
        std::fs::metadata(self.cache.container_path(fid))
            .is_ok_and(|m| self.own_store_ran(base, server, ContainerStamp::of(&m)))
    }

    async fn server_attr(&self, dir: Fid, name: &str) -> Option<Attr> {
        if dir.is_local() {
            return None;
        }
        self.remote(self.client.lookup(LookupReq { dir, name: name.to_string() })).await.ok().map(|e| e.attr)
    }

    pub(crate) fn record_conflict(
        &self,
        kind: ConflictKind,
        path: &str,
        server: Option<Attr>,
        local: Option<&File>,
        renamed_from: Option<String>,
        detail: String,
    ) -> Result<u64> {
        let local_side = match local.and_then(|f| f.metadata().ok()) {
            Some(m) => Side { exists: true, size: m.len(), mtime: ContainerStamp::of(&m).mtime },
            None => Side::default(),
        };
        let c = Conflict {
            id: 0,
            path: path.to_string(),
            kind,
            server_fid: server.as_ref().map(|a| a.fid),
            server_version: server.as_ref().map(|a| a.version.clone()),
            server: match &server {
                Some(a) => Side { exists: true, size: a.size, mtime: a.mtime },
                None => Side::default(),
            },
            local: local_side,
            renamed_from,
            detail,
            when: crate::cache::now_secs(),
        };
        self.conflicts.add(c, local)
    }

    /// A connected store refused for a stale base: a conflict like an offline one.
    pub(crate) fn conflict_from_store(
        &self,
        fid: Fid,
        path: &str,
        local: &File,
        server: Option<Attr>,
        detail: &str,
    ) -> Result<()> {
        self.record_conflict(ConflictKind::UpdateUpdate, path, server, Some(local), None, detail.to_string())?;
        self.cache.update(fid, |n| {
            n.dirty = false;
            n.cached = false;
            n.valid = false;
        });
        Ok(())
    }
}

enum Refusal {
    Conflict,
    /// A directory created on both sides: the local one became the server's.
    Merged(Fid),
    /// The server already has the effect (removing something already gone).
    Harmless,
    /// Creating this local fid failed; records naming it are void.
    CreateFailed(Fid),
}
