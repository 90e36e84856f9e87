//! The protocol's operations, as the server runs them.
//!
//! Reads answer from the export and the database, giving callback promises
//! as they go. Mutations take the stripe locks of what they touch, decide,
//! and hand a [`Plan`] to [`Volume::execute`], which makes them durable,
//! at-most-once and crash-safe.

use crate::db::Object;
use crate::export::{Dir, Stat};
use crate::handles::Kind;
use crate::readahead;
use crate::volume::{Intent, NewKind, Plan, Volume};
use common::error::validate_name;
use common::frame::CHUNK_SIZE;
use common::proto::*;
use common::{Attr, Fid, FileKind, FsError, FsStats, Timestamp, VersionVector};
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;

/// The namespace lock, held shared or exclusive (for its `Drop` only).
#[allow(dead_code)]
enum NsGuard<'a> {
    Read(tokio::sync::RwLockReadGuard<'a, ()>),
    Write(tokio::sync::RwLockWriteGuard<'a, ()>),
}

/// A name to create: what `make` needs to know.
struct NewName {
    dir: Fid,
    name: String,
    mode: u32,
    what: NewKind,
    /// O_EXCL: an existing name is an error rather than opened.
    exclusive: bool,
    /// A new file's first content (see [`CreateReq::content`]).
    content: Option<NewContent>,
}

/// Largest content a store writes in place into an empty file (it travels
/// in the database's log as part of the commit).
const FILL_MAX: usize = CREATE_CONTENT_MAX;

/// A store's new content before it is committed.
enum Content {
    /// Small content still in memory: written in place, or staged under the lock.
    Bytes(bytes::Bytes),
    /// In a staging file (name, file).
    Staged((String, std::fs::File)),
}

/// Refuses a mutation whose base version is no longer the object's version.
fn check_base(vol: &Volume, fid: Fid, obj: &Object, st: &Stat, base: Option<&VersionVector>) -> Result<(), FsError> {
    match base {
        Some(b) if *b != obj.version => Err(FsError::Conflict(Box::new(vol.attr(fid, obj, st)))),
        _ => Ok(()),
    }
}

fn bumped(obj: &Object, who: uuid::Uuid) -> Object {
    let mut o = obj.clone();
    o.version.increment(who);
    o
}

/// The attributes a directory will have once an entry changed in it.
fn dir_after(vol: &Volume, fid: Fid, obj: &Object, st: &Stat, now: Timestamp) -> Attr {
    let mut a = vol.attr(fid, obj, st);
    a.mtime = now;
    a.ctime = now;
    a
}

impl Volume {
    fn promise_for(&self, cx: &CallContext, fid: Fid) -> Option<Promise> {
        self.callbacks.promise(cx.client(), fid).ok()
    }

    /// The file a store replaces, checked: a regular file still at the
    /// store's base version. The caller holds its stripe.
    async fn storable(&self, req: &StoreReq) -> Result<(Object, Stat), FsError> {
        let (obj, st) = self.current(req.fid, true).await?;
        match obj.kind {
            FileKind::File => {}
            FileKind::Dir => return Err(FsError::IsDir),
            FileKind::Symlink => return Err(FsError::Invalid("cannot store into a symlink".into())),
        }
        check_base(self, req.fid, &obj, &st, Some(&req.base))?;
        Ok((obj, st))
    }

    /// Current object, stat and attributes of `fid`, noticing outside edits.
    async fn current(&self, fid: Fid, held: bool) -> Result<(Object, Stat), FsError> {
        let obj = self.object(fid)?;
        let st = self.stat_of(fid)?;
        let obj = self.notice_external(fid, obj, &st, held).await?;
        Ok((obj, st))
    }

    /// The directory of `fid`'s first name, where its staging file should
    /// be allocated. Placement only: outside the lock the object may move.
    fn placement(&self, fid: Fid) -> Option<Dir> {
        let (parent, _) = self.object(fid).ok()?.names.first().cloned()?;
        self.open_dir(parent).ok().map(|(dir, _)| dir)
    }

    /// A staging file holding `bytes`, allocated near `near` if given.
    fn stage_bytes(&self, near: Option<&Dir>, bytes: &[u8]) -> Result<(String, std::fs::File), FsError> {
        let (name, mut f) = match near {
            Some(dir) => self.new_staging_file_near(dir)?,
            None => self.new_staging_file()?,
        };
        if let Err(e) = tokio::task::block_in_place(|| f.write_all(bytes)) {
            let _ = std::fs::remove_file(self.staging_path.join(&name));
            return Err(e.into());
        }
        Ok((name, f))
    }

    /// A first look, without the lock, at whether a store of `len` bytes
    /// can fill the file in place (see [`Volume::fillable`]).
    fn may_fill(&self, fid: Fid, len: usize) -> bool {
        len <= FILL_MAX && self.object(fid).is_ok_and(|o| self.stat_of(fid).is_ok_and(|st| self.fillable(&o, &st)))
    }

    /// Whether the object's file can take new content in place: it is empty
    /// on disk, has one name and no fetch is reading it, so nobody can see
    /// the old content torn by the write. The caller holds its stripe.
    fn fillable(&self, obj: &Object, st: &Stat) -> bool {
        obj.names.len() == 1 && st.is_file() && st.size == 0 && st.nlink == 1 && !self.handles.reading(st.ino)
    }

    /// Stores small content into an empty file by writing it in place: the
    /// bytes travel in the committed intent, so once the commit is durable a
    /// crash at any later point is repaired by writing them again. One
    /// flush and one fsync of the file, where a staged store needs an fsync
    /// of the staged file, the flush, a rename and an fsync of the directory.
    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &self,
        cx: &CallContext,
        fid: Fid,
        obj: Object,
        st: Stat,
        dir: Vec<String>,
        name: String,
        data: bytes::Bytes,
        mode: u32,
        mtime: Timestamp,
    ) -> Result<EntryReply, FsError> {
        let now = Timestamp::now();
        let new_st = Stat { size: data.len() as u64, mtime, ctime: now, mode: (st.mode & !0o7777) | mode, ..st };
        let mut new_obj = bumped(&obj, cx.client());
        new_obj.seen = (&new_st).into();
        let version_after = new_obj.version.clone();
        let reply = EntryReply { attr: self.attr(fid, &new_obj, &new_st), promise: self.promise_for(cx, fid) };
        let plan = Plan {
            objects: vec![(fid, Some(new_obj))],
            dirents: vec![],
            intent: Some(Intent::Fill { fid, version: version_after, dir, name, data: data.to_vec(), mode, mtime }),
            reseen: vec![fid],
            breaks: vec![fid],
        };
        match self.execute(&cx.xid, OpKind::Store, plan, Reply::Store(reply)).await? {
            Reply::Store(r) => Ok(r),
            _ => unreachable!(),
        }
    }

    /// Creates a file, directory or symlink: the shared body of create,
    /// mkdir and symlink.
    async fn make(&self, cx: &CallContext, kind: OpKind, mut new: NewName) -> Result<NewEntry, FsError> {
        validate_name(&new.name)?;
        let content = match new.content.take() {
            Some(c) if matches!(new.what, NewKind::File) => Some(self.new_content(cx, new.dir, c)?),
            Some(_) => return Err(FsError::Invalid("content only comes with a new file".into())),
            None => None,
        };
        let staging = match &content {
            Some((Content::Staged((name, _)), _, _)) => Some(name.clone()),
            _ => None,
        };
        let made = self.make_with(cx, kind, new, content).await;
        if let (Err(_), Some(name)) = (&made, staging) {
            let _ = std::fs::remove_file(self.staging_path.join(name));
        }
        made
    }

    /// A create's content, checked: small bytes to write in place, or a
    /// staging file (staged by the client, or here for larger bytes).
    fn new_content(&self, cx: &CallContext, dir: Fid, c: NewContent) -> Result<(Content, u64, Timestamp), FsError> {
        if !c.mtime.is_valid() {
            return Err(FsError::Invalid("mtime out of range".into()));
        }
        let content = match c.data {
            StoreData::Inline(bytes) if bytes.len() as u64 != c.size => {
                return Err(FsError::Invalid(format!("{} bytes sent for a size of {}", bytes.len(), c.size)));
            }
            StoreData::Inline(bytes) if bytes.len() <= FILL_MAX => Content::Bytes(bytes),
            StoreData::Inline(bytes) => {
                Content::Staged(self.stage_bytes(self.open_dir(dir).ok().map(|(d, _)| d).as_ref(), &bytes)?)
            }
            StoreData::Staged(h) => {
                let (name, file) = self.take_stage(cx, h)?;
                let len = file.metadata()?.len();
                if len != c.size {
                    let _ = std::fs::remove_file(self.staging_path.join(&name));
                    return Err(FsError::Invalid(format!("staged {len} bytes for a size of {}", c.size)));
                }
                Content::Staged((name, file))
            }
        };
        Ok((content, c.size, c.mtime))
    }

    /// The staging file a client staged under handle `h` (the handle is used up).
    fn take_stage(&self, cx: &CallContext, h: u64) -> Result<(String, std::fs::File), FsError> {
        let handle = self.handles.take(cx.client(), h).ok_or(FsError::Stale)?;
        let Kind::Stage(name) = &handle.kind else {
            return Err(FsError::Invalid("not a stage handle".into()));
        };
        Ok((name.clone(), handle.file.try_clone()?))
    }

    /// `make` with the content taken in (the caller drops a staging file
    /// this fails to use).
    async fn make_with(
        &self,
        cx: &CallContext,
        kind: OpKind,
        new: NewName,
        content: Option<(Content, u64, Timestamp)>,
    ) -> Result<NewEntry, FsError> {
        let NewName { dir, name, mode, what, exclusive, .. } = new;
        if self.hidden(dir, &name) {
            return Err(FsError::Access);
        }
        let fid = self.new_fid()?;
        let _ns = self.ns_lock.read().await;
        let _g = self.lock(&[dir, fid]).await;
        let (d, dpath) = self.open_dir(dir)?;
        let (dobj, dst) = self.current(dir, true).await?;
        if let Some((efid, eobj, est)) = self.resolve_locked(&d, dir, &name)? {
            // Not exclusive and a file already there: O_CREAT opens it
            // (but content is never written over a file the client did not see).
            if !exclusive && content.is_none() && matches!(what, NewKind::File) && eobj.kind == FileKind::File {
                let attr = self.attr(efid, &eobj, &est);
                return Ok(NewEntry { attr, dir: self.attr(dir, &dobj, &dst), promise: self.promise_for(cx, efid) });
            }
            return Err(FsError::Exists);
        }
        let now = Timestamp::now();
        let (fkind, perm, size) = match &what {
            NewKind::File => (FileKind::File, mode & 0o7777, content.as_ref().map_or(0, |(_, size, _)| *size)),
            NewKind::Dir => (FileKind::Dir, mode & 0o7777, 0),
            NewKind::Symlink(t) => (FileKind::Symlink, 0o777, t.len() as u64),
        };
        let mut version = VersionVector::new();
        version.increment(cx.client());
        let obj = Object { kind: fkind, names: vec![(dir, name.clone())], version, seen: Default::default() };
        let new_dir = bumped(&dobj, cx.client());
        let attr = Attr {
            fid,
            kind: fkind,
            size,
            mode: perm,
            nlink: if fkind == FileKind::Dir { 2 } else { 1 },
            uid: unsafe { libc::geteuid() },
            gid: unsafe { libc::getegid() },
            atime: now,
            mtime: content.as_ref().map_or(now, |(_, _, mtime)| *mtime),
            ctime: now,
            version: obj.version.clone(),
        };
        let reply =
            NewEntry { attr, dir: dir_after(self, dir, &new_dir, &dst, now), promise: self.promise_for(cx, fid) };
        let intent = match content {
            // Written whole by the intent, like a store into an empty file:
            // the bytes are in the commit, so a crash is repaired by
            // writing them again.
            Some((Content::Bytes(data), _, mtime)) => Intent::Fill {
                fid,
                version: obj.version.clone(),
                dir: dpath.names().to_vec(),
                name: name.clone(),
                data: data.to_vec(),
                mode: perm,
                mtime,
            },
            // Renamed into place, like a large store (never over a name
            // the database does not know, such as a FIFO).
            Some((Content::Staged((staging, file)), _, mtime)) => {
                tokio::task::block_in_place(|| -> Result<(), FsError> {
                    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(perm))?;
                    file.set_modified(mtime.into())?;
                    // The content must be on disk before the commit says it is.
                    Ok(file.sync_all()?)
                })?;
                Intent::Install {
                    staging,
                    dir: dpath.names().to_vec(),
                    name: name.clone(),
                    others: Vec::new(),
                    new: true,
                }
            }
            None => Intent::Create {
                dir: dpath.names().to_vec(),
                name: name.clone(),
                mode: perm,
                mtime: now,
                what,
                fid: Some(fid),
            },
        };
        let plan = Plan {
            objects: vec![(fid, Some(obj)), (dir, Some(new_dir))],
            dirents: vec![(dir, name, Some(fid))],
            intent: Some(intent),
            reseen: vec![fid, dir],
            breaks: vec![dir],
        };
        let reply = match kind {
            OpKind::Mkdir => Reply::Mkdir(reply),
            OpKind::Symlink => Reply::Symlink(reply),
            _ => Reply::Create(reply),
        };
        match self.execute(&cx.xid, kind, plan, reply).await? {
            Reply::Create(r) | Reply::Mkdir(r) | Reply::Symlink(r) => Ok(r),
            _ => unreachable!("make builds one of these replies"),
        }
    }

    /// The object a reintegrated store, setattr or remove is about.
    fn reintegration_subject(&self, req: &Request) -> Option<Fid> {
        match req {
            Request::Store(r) => Some(r.fid),
            Request::SetAttr(r) => Some(r.fid),
            Request::Remove(r) => self.db.dirent(r.dir, &r.name).ok().flatten(),
            _ => None,
        }
    }

    /// Runs one record of a reintegration under its own transaction id.
    async fn reintegrate_one(&self, cx: &CallContext, req: Request) -> Result<Reply, FsError> {
        let kind = req.kind();
        self.stats.count_reintegrated(kind);
        if kind.mutates() {
            if let Some(r) = self.recorded_reply(&cx.xid) {
                return r;
            }
        }
        match req {
            Request::Store(r) => self.store(cx, r).await.map(Reply::Store),
            Request::Create(r) => self.create(cx, r).await.map(Reply::Create),
            Request::Mkdir(r) => self.mkdir(cx, r).await.map(Reply::Mkdir),
            Request::Symlink(r) => self.symlink(cx, r).await.map(Reply::Symlink),
            Request::Link(r) => self.link(cx, r).await.map(Reply::Link),
            Request::Remove(r) => self.remove(cx, r).await.map(Reply::Remove),
            Request::Rmdir(r) => self.rmdir(cx, r).await.map(Reply::Rmdir),
            Request::Rename(r) => self.rename(cx, r).await.map(Reply::Rename),
            Request::SetAttr(r) => self.setattr(cx, r).await.map(Reply::SetAttr),
            other => Err(FsError::Invalid(format!("{:?} cannot be reintegrated", other.kind()))),
        }
    }
}

impl Service for Volume {
    async fn lookup(&self, cx: &CallContext, req: LookupReq) -> Result<EntryReply, FsError> {
        let (fid, obj, st) = self.resolve(req.dir, &req.name).await?;
        let promise = self.promise_for(cx, fid);
        Ok(EntryReply { attr: self.attr(fid, &obj, &st), promise })
    }

    async fn getattr(&self, cx: &CallContext, req: GetAttrReq) -> Result<EntryReply, FsError> {
        let promise = self.promise_for(cx, req.fid);
        let (obj, st) = self.current(req.fid, false).await?;
        Ok(EntryReply { attr: self.attr(req.fid, &obj, &st), promise })
    }

    async fn readdir(&self, cx: &CallContext, req: ReadDirReq) -> Result<ReadDirReply, FsError> {
        let promise = self.promise_for(cx, req.dir);
        let (obj, st) = self.current(req.dir, false).await?;
        let _g = self.lock(&[req.dir]).await;
        let (d, _) = self.open_dir(req.dir)?;
        let names = tokio::task::block_in_place(|| d.list())?;
        let entries = tokio::task::block_in_place(|| self.entries_locked(&d, req.dir, &names))?;
        // Forget names that vanished from disk behind the server's back.
        let prefix = req.dir.0.to_be_bytes();
        for (k, _) in self.db.dirents.scan_prefix(prefix).flatten() {
            let name = String::from_utf8_lossy(&k[8..]).into_owned();
            if !names.contains(&name) {
                let _ = self.db.dirents.remove(&k);
            }
        }
        Ok(ReadDirReply { attr: self.attr(req.dir, &obj, &st), entries, promise })
    }

    async fn fetch(&self, cx: &CallContext, req: FetchReq) -> Result<FetchReply, FsError> {
        // The promise comes first, so a store racing with this fetch breaks it.
        let promise = self.promise_for(cx, req.fid);
        let (obj, st) = self.current(req.fid, false).await?;
        match obj.kind {
            FileKind::Dir => return Err(FsError::IsDir),
            FileKind::Symlink => {
                let (parent, name) = obj.names.first().cloned().ok_or(FsError::Stale)?;
                let (d, _) = self.open_dir(parent)?;
                let target = d.readlink(&name)?;
                return Ok(FetchReply {
                    attr: self.attr(req.fid, &obj, &st),
                    promise,
                    data: target.into_bytes().into(),
                    handle: None,
                });
            }
            FileKind::File => {}
        }
        // Open and read the version under the lock, so the descriptor and the
        // version belong together; the data is read after letting go.
        let (file, attr) = {
            let _ns = self.ns_lock.read().await;
            let _g = self.lock(&[req.fid]).await;
            let obj = self.object(req.fid)?;
            let path = self.path_of(req.fid)?;
            // O_NONBLOCK: if a FIFO was put there, opening must not hang.
            let file = self.export.open_file(&path, libc::O_RDONLY | libc::O_NONBLOCK)?;
            // Chunks are read in parallel but in order: ask for aggressive readahead.
            // SAFETY: advisory call on a valid descriptor.
            unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&file), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
            let st = crate::export::fstat(std::os::fd::AsRawFd::as_raw_fd(&file))?;
            if !st.is_file() {
                return Err(FsError::NotSupported("not a regular file".into()));
            }
            let obj = self.notice_external(req.fid, obj, &st, true).await?;
            (file, self.attr(req.fid, &obj, &st))
        };
        let inline = (req.inline_max as usize).min(CHUNK_SIZE) as u64;
        let first = attr.size.min(inline) as usize;
        let mut data = vec![0u8; first];
        let chunks_follow = attr.size > first as u64;
        if chunks_follow {
            // Off the reply's path: the chunks asked for next find the
            // disk already reading. Without a second descriptor the
            // kernel's own readahead still serves them.
            if let Ok(dup) = file.try_clone() {
                readahead::start(std::sync::Arc::new(dup), first as u64, readahead::AHEAD - first as u64);
            }
        }
        tokio::task::block_in_place(|| file.read_exact_at(&mut data, 0))?;
        let handle = if chunks_follow {
            Some(
                self.handles
                    .insert(cx.client(), file, Kind::Read)
                    .ok_or(FsError::Io("too many open transfers".into()))?,
            )
        } else {
            None
        };
        Ok(FetchReply { attr, promise, data: data.into(), handle })
    }

    async fn read_chunk(&self, cx: &CallContext, req: ReadChunkReq) -> Result<Chunk, FsError> {
        if req.len as usize > CHUNK_SIZE {
            return Err(FsError::Invalid(format!("chunk of {} bytes exceeds {CHUNK_SIZE}", req.len)));
        }
        let file = self.handles.reader(cx.client(), req.handle).ok_or(FsError::Stale)?;
        // The bytes are not read here: the reply names the range, and the
        // connection's writer sends it straight from the page cache. Past
        // the end of the file the chunk is short, as a read would be.
        let size = file.metadata()?.len();
        let len = (req.len as u64).min(size.saturating_sub(req.offset)) as usize;
        if let Some((offset, len)) = readahead::range_for(req.offset, len as u64) {
            readahead::start(file.clone(), offset, len);
        }
        Ok(Chunk { data: Payload::File(FileSlice { file, offset: req.offset, len }) })
    }

    async fn release(&self, cx: &CallContext, req: ReleaseReq) -> Result<(), FsError> {
        self.handles.release(cx.client(), req.handle);
        Ok(())
    }

    async fn readlink(&self, _cx: &CallContext, req: ReadlinkReq) -> Result<LinkTarget, FsError> {
        let obj = self.object(req.fid)?;
        if obj.kind != FileKind::Symlink {
            return Err(FsError::Invalid("not a symlink".into()));
        }
        let (parent, name) = obj.names.first().cloned().ok_or(FsError::Stale)?;
        let (d, _) = self.open_dir(parent)?;
        Ok(LinkTarget { target: d.readlink(&name)? })
    }

    async fn stage_open(&self, cx: &CallContext, _req: StageOpenReq) -> Result<StageHandle, FsError> {
        let (name, file) = self.new_staging_file()?;
        match self.handles.insert(cx.client(), file, Kind::Stage(name.clone())) {
            Some(handle) => Ok(StageHandle { handle }),
            None => {
                let _ = std::fs::remove_file(self.staging_path.join(name));
                Err(FsError::Io("too many open transfers".into()))
            }
        }
    }

    async fn stage_write(&self, cx: &CallContext, req: StageWriteReq) -> Result<(), FsError> {
        let file = self.handles.get(cx.client(), req.handle, true).ok_or(FsError::Stale)?;
        tokio::task::block_in_place(|| file.write_all_at(&req.data, req.offset))?;
        Ok(())
    }

    async fn store(&self, cx: &CallContext, req: StoreReq) -> Result<EntryReply, FsError> {
        if req.mtime.is_some_and(|t| !t.is_valid()) {
            return Err(FsError::Invalid("mtime out of range".into()));
        }
        let content = match &req.data {
            StoreData::Inline(bytes) if bytes.len() as u64 != req.size => {
                return Err(FsError::Invalid(format!("{} bytes sent for a size of {}", bytes.len(), req.size)));
            }
            StoreData::Inline(bytes) if self.may_fill(req.fid, bytes.len()) => {
                // Likely written in place (decided under the lock); staged
                // there only if that no longer holds.
                Content::Bytes(bytes.clone())
            }
            StoreData::Inline(bytes) => Content::Staged(self.stage_bytes(self.placement(req.fid).as_ref(), bytes)?),
            StoreData::Staged(h) => Content::Staged(self.take_stage(cx, *h)?),
        };
        let mut staging = match &content {
            Content::Staged((name, _)) => Some(name.clone()),
            Content::Bytes(_) => None,
        };
        let discard = |staging: &Option<String>, e: FsError| {
            if let Some(name) = staging {
                let _ = std::fs::remove_file(self.staging_path.join(name));
            }
            e
        };
        if let Content::Staged((_, file)) = &content {
            let len = file.metadata().map_err(|e| discard(&staging, e.into()))?.len();
            if len != req.size {
                let e = FsError::Invalid(format!("staged {len} bytes for a size of {}", req.size));
                return Err(discard(&staging, e));
            }
        }
        let _ns = self.ns_lock.read().await;
        let result = async {
            let _g = self.lock(&[req.fid]).await;
            let (obj, st) = self.storable(&req).await?;
            let mode = req.mode.unwrap_or(st.mode) & 0o7777;
            let mtime = req.mtime.unwrap_or_else(Timestamp::now);
            let (parent, name) = obj.names.first().cloned().ok_or(FsError::Stale)?;
            let (dir, dpath) = self.open_dir(parent)?;
            if let Content::Bytes(bytes) = &content {
                if self.fillable(&obj, &st) {
                    return self
                        .fill(cx, req.fid, obj, st, dpath.names().to_vec(), name, bytes.clone(), mode, mtime)
                        .await;
                }
            }
            let file = match &content {
                Content::Bytes(bytes) => {
                    let (n, f) = self.stage_bytes(Some(&dir), bytes)?;
                    staging = Some(n);
                    f
                }
                Content::Staged((_, f)) => f.try_clone()?,
            };
            let mut others = Vec::new();
            for (p, n) in obj.names.iter().skip(1) {
                others.push((self.open_dir(*p)?.1.names().to_vec(), n.clone()));
            }
            let new_st = tokio::task::block_in_place(|| -> Result<Stat, FsError> {
                file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
                std::os::unix::fs::fchown(&file, Some(st.uid), Some(st.gid))?;
                file.set_modified(mtime.into())?;
                // The content must be on disk before the commit says it is.
                file.sync_all()?;
                crate::export::fstat(std::os::fd::AsRawFd::as_raw_fd(&file))
            })?;
            let mut new_obj = bumped(&obj, cx.client());
            new_obj.seen = (&new_st).into();
            let mut attr = self.attr(req.fid, &new_obj, &new_st);
            attr.nlink = st.nlink;
            let reply = EntryReply { attr, promise: self.promise_for(cx, req.fid) };
            let staging = staging.clone().ok_or(FsError::Io("no staged content".into()))?;
            let parents: Vec<Fid> = obj.names.iter().map(|(p, _)| *p).collect();
            let plan = Plan {
                objects: vec![(req.fid, Some(new_obj))],
                dirents: vec![],
                intent: Some(Intent::Install { staging, dir: dpath.names().to_vec(), name, others, new: false }),
                reseen: [req.fid].into_iter().chain(parents.iter().copied()).collect(),
                breaks: vec![req.fid],
            };
            // The install renames into the file's directories, whose
            // stripes this store does not hold (holding them would make every
            // store in a directory wait for the one before): until `execute`
            // has recorded their new state, checks for outside edits leave
            // them alone.
            let _settling = self.settling(parents);
            match self.execute(&cx.xid, OpKind::Store, plan, Reply::Store(reply)).await? {
                Reply::Store(r) => Ok(r),
                _ => unreachable!(),
            }
        }
        .await;
        result.map_err(|e| discard(&staging, e))
    }

    async fn create(&self, cx: &CallContext, req: CreateReq) -> Result<NewEntry, FsError> {
        let new = NewName {
            dir: req.dir,
            name: req.name,
            mode: req.mode,
            what: NewKind::File,
            exclusive: req.exclusive,
            content: req.content,
        };
        self.make(cx, OpKind::Create, new).await
    }

    async fn mkdir(&self, cx: &CallContext, req: MkdirReq) -> Result<NewEntry, FsError> {
        let new = NewName {
            dir: req.dir,
            name: req.name,
            mode: req.mode,
            what: NewKind::Dir,
            exclusive: true,
            content: None,
        };
        self.make(cx, OpKind::Mkdir, new).await
    }

    async fn symlink(&self, cx: &CallContext, req: SymlinkReq) -> Result<NewEntry, FsError> {
        if req.target.is_empty() || req.target.contains('\0') || req.target.len() > 4095 {
            return Err(FsError::Invalid("bad symlink target".into()));
        }
        let new = NewName {
            dir: req.dir,
            name: req.name,
            mode: 0o777,
            what: NewKind::Symlink(req.target),
            exclusive: true,
            content: None,
        };
        self.make(cx, OpKind::Symlink, new).await
    }

    async fn link(&self, cx: &CallContext, req: LinkReq) -> Result<NewEntry, FsError> {
        validate_name(&req.name)?;
        if self.hidden(req.dir, &req.name) {
            return Err(FsError::Access);
        }
        let _ns = self.ns_lock.read().await;
        let _g = self.lock(&[req.dir, req.fid]).await;
        let (d, dpath) = self.open_dir(req.dir)?;
        let (dobj, dst) = self.current(req.dir, true).await?;
        let (obj, st) = self.current(req.fid, true).await?;
        if obj.kind == FileKind::Dir {
            return Err(FsError::NotPermitted);
        }
        if self.resolve_locked(&d, req.dir, &req.name)?.is_some() {
            return Err(FsError::Exists);
        }
        let (from_parent, from_name) = obj.names.first().cloned().ok_or(FsError::Stale)?;
        let (_, from_path) = self.open_dir(from_parent)?;
        let now = Timestamp::now();
        // A new name is not new content: the version (which clients check
        // their cached content and their logged changes against) stays.
        let mut new_obj = obj.clone();
        new_obj.names.push((req.dir, req.name.clone()));
        let new_dir = bumped(&dobj, cx.client());
        let mut attr = self.attr(req.fid, &new_obj, &st);
        attr.nlink += 1;
        attr.ctime = now;
        let reply = NewEntry {
            attr,
            dir: dir_after(self, req.dir, &new_dir, &dst, now),
            promise: self.promise_for(cx, req.fid),
        };
        let plan = Plan {
            objects: vec![(req.fid, Some(new_obj)), (req.dir, Some(new_dir))],
            dirents: vec![(req.dir, req.name.clone(), Some(req.fid))],
            intent: Some(Intent::Link {
                from_dir: from_path.names().to_vec(),
                from: from_name,
                dir: dpath.names().to_vec(),
                name: req.name,
            }),
            reseen: vec![req.fid, req.dir],
            breaks: vec![req.fid, req.dir],
        };
        match self.execute(&cx.xid, OpKind::Link, plan, Reply::Link(reply)).await? {
            Reply::Link(r) => Ok(r),
            _ => unreachable!(),
        }
    }

    async fn remove(&self, cx: &CallContext, req: RemoveReq) -> Result<DirChanged, FsError> {
        self.unlink_common(cx, req.dir, req.name, req.base, false).await
    }

    async fn rmdir(&self, cx: &CallContext, req: RmdirReq) -> Result<DirChanged, FsError> {
        self.unlink_common(cx, req.dir, req.name, None, true).await
    }

    async fn rename(&self, cx: &CallContext, req: RenameReq) -> Result<RenameReply, FsError> {
        validate_name(&req.from_name)?;
        validate_name(&req.to_name)?;
        if self.hidden(req.from_dir, &req.from_name) || self.hidden(req.to_dir, &req.to_name) {
            return Err(FsError::Access);
        }
        // Lock the directories, find the objects, and make sure their stripes
        // are held too; if not, start over holding all of them.
        let mut want = vec![req.from_dir, req.to_dir];
        // Moving a directory changes the paths of everything below it: it
        // runs alone (other changes hold the namespace lock shared, from
        // planning to applying, so their paths stay put).
        let mut exclusive = false;
        for _ in 0..8 {
            let _ns = if exclusive {
                NsGuard::Write(self.ns_lock.write().await)
            } else {
                NsGuard::Read(self.ns_lock.read().await)
            };
            let _g = self.lock(&want).await;
            let (fd, fpath) = self.open_dir(req.from_dir)?;
            let (td, tpath) = self.open_dir(req.to_dir)?;
            let (src, sobj, sst) = self.resolve_locked(&fd, req.from_dir, &req.from_name)?.ok_or(FsError::NotFound)?;
            if sobj.kind == FileKind::Dir && !exclusive {
                exclusive = true;
                continue;
            }
            let target = self.resolve_locked(&td, req.to_dir, &req.to_name)?;
            let mut need = vec![src];
            if let Some((t, _, _)) = &target {
                need.push(*t);
            }
            if !Volume::covered(&want, &need) {
                want.extend(need);
                continue;
            }
            let (fobj, fst) = self.current(req.from_dir, true).await?;
            let (tobj, tst) =
                if req.to_dir == req.from_dir { (fobj.clone(), fst) } else { self.current(req.to_dir, true).await? };
            let now = Timestamp::now();
            if let Some((t, _, _)) = &target {
                if *t == src {
                    // Two names of one object, or the same name: nothing to do.
                    return Ok(RenameReply {
                        from_dir: self.attr(req.from_dir, &fobj, &fst),
                        to_dir: self.attr(req.to_dir, &tobj, &tst),
                        moved: self.attr(src, &sobj, &sst),
                    });
                }
                if req.no_replace {
                    return Err(FsError::Exists);
                }
                if let (Some(base), Some((_, tgt, tgt_st))) = (&req.replaced_base, &target) {
                    let tgt = self.notice_external(*t, tgt.clone(), tgt_st, true).await?;
                    check_base(self, *t, &tgt, tgt_st, Some(base))?;
                }
            }
            if sobj.kind == FileKind::Dir {
                // A directory cannot move into itself or below itself.
                let mut cur = req.to_dir;
                for _ in 0..4096 {
                    if cur == src {
                        return Err(FsError::Invalid("cannot move a directory into itself".into()));
                    }
                    if cur == Fid::ROOT {
                        break;
                    }
                    cur = self.object(cur)?.names.first().map(|(p, _)| *p).ok_or(FsError::Stale)?;
                }
            }
            let mut plan = Plan::default();
            if let Some((t, tgt, tgt_st)) = &target {
                match (sobj.kind == FileKind::Dir, tgt.kind == FileKind::Dir) {
                    (true, false) => return Err(FsError::NotDir),
                    (false, true) => return Err(FsError::IsDir),
                    (true, true) => {
                        let (dd, _) = self.open_dir(*t)?;
                        if !dd.list()?.is_empty() {
                            return Err(FsError::NotEmpty);
                        }
                    }
                    _ => {}
                }
                let mut gone = tgt.clone();
                gone.names.retain(|(p, n)| !(*p == req.to_dir && *n == req.to_name));
                if gone.names.is_empty() || tgt.kind == FileKind::Dir {
                    plan.objects.push((*t, None));
                } else {
                    let _ = tgt_st;
                    // One name less, same content: same version.
                    plan.objects.push((*t, Some(gone)));
                    plan.reseen.push(*t);
                }
                plan.breaks.push(*t);
            }
            let mut moved = sobj.clone();
            for n in moved.names.iter_mut() {
                if n.0 == req.from_dir && n.1 == req.from_name {
                    *n = (req.to_dir, req.to_name.clone());
                }
            }
            let new_from = bumped(&fobj, cx.client());
            plan.objects.push((src, Some(moved.clone())));
            plan.objects.push((req.from_dir, Some(new_from.clone())));
            let new_to = if req.to_dir != req.from_dir {
                let t = bumped(&tobj, cx.client());
                plan.objects.push((req.to_dir, Some(t.clone())));
                t
            } else {
                new_from.clone()
            };
            plan.dirents.push((req.from_dir, req.from_name.clone(), None));
            plan.dirents.push((req.to_dir, req.to_name.clone(), Some(src)));
            plan.intent = Some(Intent::Rename {
                from_dir: fpath.names().to_vec(),
                from: req.from_name.clone(),
                to_dir: tpath.names().to_vec(),
                to: req.to_name.clone(),
            });
            plan.reseen.extend([src, req.from_dir, req.to_dir]);
            plan.breaks.extend([req.from_dir, req.to_dir, src]);
            let mut moved_attr = self.attr(src, &moved, &sst);
            moved_attr.ctime = now;
            let reply = RenameReply {
                from_dir: dir_after(self, req.from_dir, &new_from, &fst, now),
                to_dir: dir_after(self, req.to_dir, &new_to, &tst, now),
                moved: moved_attr,
            };
            return match self.execute(&cx.xid, OpKind::Rename, plan, Reply::Rename(reply)).await? {
                Reply::Rename(r) => Ok(r),
                _ => unreachable!(),
            };
        }
        Err(FsError::Io("rename kept racing with other changes; try again".into()))
    }

    async fn setattr(&self, cx: &CallContext, req: SetAttrReq) -> Result<EntryReply, FsError> {
        if [req.set.atime, req.set.mtime].iter().flatten().any(|t| !t.is_valid()) {
            return Err(FsError::Invalid("time out of range".into()));
        }
        let _ns = self.ns_lock.read().await;
        let _g = self.lock(&[req.fid]).await;
        let (obj, st) = self.current(req.fid, true).await?;
        check_base(self, req.fid, &obj, &st, req.base.as_ref())?;
        if req.set.size.is_some() && obj.kind == FileKind::Dir {
            return Err(FsError::IsDir);
        }
        if req.set.mode.is_some() && obj.kind == FileKind::Symlink {
            return Err(FsError::NotSupported("chmod of a symlink".into()));
        }
        if req.set.is_empty() {
            return Ok(EntryReply { attr: self.attr(req.fid, &obj, &st), promise: self.promise_for(cx, req.fid) });
        }
        let path = self.path_of(req.fid)?;
        let new_obj = bumped(&obj, cx.client());
        let mut attr = self.attr(req.fid, &new_obj, &st);
        let s = &req.set;
        if let Some(m) = s.mode {
            attr.mode = m & 0o7777;
        }
        if let Some(u) = s.uid {
            attr.uid = u;
        }
        if let Some(g) = s.gid {
            attr.gid = g;
        }
        if let Some(sz) = s.size {
            attr.size = sz;
            attr.mtime = Timestamp::now();
        }
        if let Some(a) = s.atime {
            attr.atime = a;
        }
        if let Some(m) = s.mtime {
            attr.mtime = m;
        }
        attr.ctime = Timestamp::now();
        let reply = EntryReply { attr, promise: self.promise_for(cx, req.fid) };
        let plan = Plan {
            objects: vec![(req.fid, Some(new_obj))],
            dirents: vec![],
            intent: Some(Intent::SetAttr { path: path.names().to_vec(), set: req.set }),
            reseen: vec![req.fid],
            breaks: vec![req.fid],
        };
        match self.execute(&cx.xid, OpKind::SetAttr, plan, Reply::SetAttr(reply)).await? {
            Reply::SetAttr(r) => Ok(r),
            _ => unreachable!(),
        }
    }

    async fn statfs(&self, _cx: &CallContext, _req: StatFsReq) -> Result<FsStats, FsError> {
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(self.export.path().as_os_str()))
            .map_err(|_| FsError::Invalid("export path".into()))?;
        // SAFETY: valid C string and out-pointer.
        if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(FsStats {
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            bsize: s.f_frsize as u32,
            namelen: 255,
        })
    }

    async fn validate(&self, cx: &CallContext, req: ValidateReq) -> Result<ValidateReply, FsError> {
        if req.items.len() > 100_000 {
            return Err(FsError::Invalid("validate batch too large".into()));
        }
        let mut current = Vec::with_capacity(req.items.len());
        let mut promise = None;
        for (fid, version) in req.items {
            let ok = match self.object(fid) {
                Ok(_) => {
                    // Promise first, then check: a racing change breaks it.
                    let p = self.promise_for(cx, fid);
                    match self.current(fid, false).await {
                        Ok((obj, _)) if obj.version == version => {
                            promise = promise.or(p);
                            true
                        }
                        _ => false,
                    }
                }
                Err(_) => false,
            };
            current.push(ok);
        }
        Ok(ValidateReply { current, promise })
    }

    async fn volume_stamp(&self, _cx: &CallContext, _req: VolumeStampReq) -> Result<VolumeStamp, FsError> {
        Ok(VolumeStamp { volume: self.volume_id, stamp: self.stamp() })
    }

    async fn reintegrate(&self, cx: &CallContext, req: ReintegrateReq) -> Result<ReintegrateReply, FsError> {
        // One batch per client at a time: a resent batch waits for the first
        // and then finds its records' replies recorded, so none runs twice.
        let turn = self.reintegration_turn(cx.client());
        let _turn = turn.lock().await;
        if req.records.len() > 100_000 {
            return Err(FsError::Invalid("reintegration batch too large".into()));
        }
        let mut results = Vec::with_capacity(req.records.len());
        // Local fids of objects created earlier in this batch -> real fids.
        let mut created: HashMap<Fid, Fid> = HashMap::new();
        // Objects this batch already changed: (version the client based its
        // changes on, version now). A later record of the same object based
        // on the former is based on the latter: it is the client's own change.
        let mut rebase: HashMap<Fid, (VersionVector, VersionVector)> = HashMap::new();
        for mut record in req.records {
            let sub = CallContext { xid: Xid { client: cx.client(), seq: record.seq }, conn: cx.conn };
            record.req.map_fids(|f| created.get(&f).copied().unwrap_or(f));
            let subject = self.reintegration_subject(&record.req);
            let base = match (&mut record.req, subject) {
                (Request::Store(StoreReq { base, .. }), Some(fid))
                | (Request::SetAttr(SetAttrReq { base: Some(base), .. }), Some(fid))
                | (Request::Remove(RemoveReq { base: Some(base), .. }), Some(fid)) => {
                    if let Some((before, after)) = rebase.get(&fid) {
                        if base == before {
                            *base = after.clone();
                        }
                    }
                    Some(base.clone())
                }
                _ => None,
            };
            let result = self.reintegrate_one(&sub, record.req).await;
            match (&result, subject, base) {
                (Ok(Reply::Create(e) | Reply::Mkdir(e) | Reply::Symlink(e)), _, _) => {
                    if let Some(local) = record.creates {
                        created.insert(local, e.attr.fid);
                    }
                    rebase.insert(e.attr.fid, (VersionVector::new(), e.attr.version.clone()));
                }
                (Ok(Reply::Store(e) | Reply::SetAttr(e)), Some(fid), Some(base)) => {
                    let before = rebase.get(&fid).map(|(b, _)| b.clone()).unwrap_or(base);
                    rebase.insert(fid, (before, e.attr.version.clone()));
                }
                _ => {}
            }
            results.push(result);
        }
        Ok(ReintegrateReply { results })
    }
}

impl Volume {
    async fn unlink_common(
        &self,
        cx: &CallContext,
        dir: Fid,
        name: String,
        base: Option<VersionVector>,
        want_dir: bool,
    ) -> Result<DirChanged, FsError> {
        validate_name(&name)?;
        if self.hidden(dir, &name) {
            return Err(FsError::Access);
        }
        let mut want = vec![dir];
        let _ns = self.ns_lock.read().await;
        for _ in 0..8 {
            let _g = self.lock(&want).await;
            let (d, dpath) = self.open_dir(dir)?;
            let (fid, obj, st) = self.resolve_locked(&d, dir, &name)?.ok_or(FsError::NotFound)?;
            if !Volume::covered(&want, &[fid]) {
                want.push(fid);
                continue;
            }
            let obj = self.notice_external(fid, obj, &st, true).await?;
            match (want_dir, obj.kind == FileKind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) => {
                    let (dd, _) = self.open_dir(fid)?;
                    if !dd.list()?.is_empty() {
                        return Err(FsError::NotEmpty);
                    }
                }
                _ => {}
            }
            check_base(self, fid, &obj, &st, base.as_ref())?;
            let (dobj, dst) = self.current(dir, true).await?;
            let now = Timestamp::now();
            let new_dir = bumped(&dobj, cx.client());
            let mut rest = obj.clone();
            rest.names.retain(|(p, n)| !(*p == dir && *n == name));
            let mut plan = Plan {
                objects: vec![(dir, Some(new_dir.clone()))],
                dirents: vec![(dir, name.clone(), None)],
                intent: Some(Intent::Remove { dir: dpath.names().to_vec(), name: name.clone(), is_dir: want_dir }),
                reseen: vec![dir],
                breaks: vec![dir, fid],
            };
            if rest.names.is_empty() {
                plan.objects.push((fid, None));
            } else {
                // One name less, same content: same version.
                plan.objects.push((fid, Some(rest)));
                plan.reseen.push(fid);
            }
            let reply = DirChanged { dir: dir_after(self, dir, &new_dir, &dst, now) };
            let (kind, wrapped) =
                if want_dir { (OpKind::Rmdir, Reply::Rmdir(reply)) } else { (OpKind::Remove, Reply::Remove(reply)) };
            return match self.execute(&cx.xid, kind, plan, wrapped).await? {
                Reply::Remove(r) | Reply::Rmdir(r) => Ok(r),
                _ => unreachable!(),
            };
        }
        Err(FsError::Io("remove kept racing with other changes; try again".into()))
    }
}
