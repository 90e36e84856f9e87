//! The cache manager's operations, independent of FUSE's calling style.
//!
//! Each operation answers from the cache when the object's callback promise
//! holds, and asks the server otherwise. Whole files are fetched into
//! container files on open and stored back whole when a modified file is
//! closed (flush). Callback breaks from the server mark objects stale and
//! invalidate the kernel's caches of them.

use crate::cache::{now_secs, Cache, ContainerStamp, Node};
use crate::errors::{errno, Result, VenusError};
use common::proto::*;
use common::rpc::{fetch_to_file, store_from_file, Client, RpcError};
use common::{Attr, Fid, FileKind, FsError, FsStats, SetAttr, Timestamp, VersionVector};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long the kernel may keep entries and attributes while a promise holds
/// (a break invalidates them sooner).
pub const LONG_TTL: Duration = Duration::from_secs(3600);
/// For answers not backed by a promise.
pub const SHORT_TTL: Duration = Duration::from_secs(1);
/// Negative names remembered per directory, to invalidate on a break.
const MAX_NEGATIVES: usize = 4096;
const STRIPES: usize = 256;

/// What a lookup found.
pub enum Found {
    Entry(Attr, Duration),
    /// No such name; the kernel may remember that for this long.
    Negative(Duration),
}

/// An open file: the container descriptor and the version its content is
/// based on. Several opens of one file share one `Shared`.
pub struct Shared {
    pub fid: Fid,
    pub file: Arc<File>,
    pub base: Mutex<VersionVector>,
    /// The container's state when last in step with the server.
    pub synced: Mutex<ContainerStamp>,
    /// The kernel's passthrough registration, kept while any handle is open.
    pub backing: Mutex<Option<fuser::BackingId>>,
}

pub struct OpenFile {
    pub shared: Arc<Shared>,
    pub write: bool,
}

/// Counters shown by `venus status`.
#[derive(Default)]
pub struct Counters {
    pub fetches: AtomicU64,
    pub stores: AtomicU64,
    pub local_hits: AtomicU64,
}

pub struct Venus {
    pub rt: tokio::runtime::Handle,
    pub client: Client,
    pub cache: Cache,
    pub notifier: OnceLock<fuser::Notifier>,
    handles: Mutex<HashMap<u64, OpenFile>>,
    /// The shared open state of each open file.
    opened: Mutex<HashMap<Fid, (usize, Arc<Shared>)>>,
    next_fh: AtomicU64,
    /// Bumped by every break, so a fetch can tell a break raced with it.
    break_gen: Mutex<HashMap<Fid, u64>>,
    negatives: Mutex<HashMap<Fid, HashSet<String>>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    pub counters: Counters,
}

fn name_str(name: &std::ffi::OsStr) -> Result<&str> {
    name.to_str().ok_or_else(|| errno(libc::EINVAL, "names must be UTF-8"))
}

fn promise_exp(p: Option<Promise>) -> Option<i64> {
    p.map(|p| p.expires)
}

impl Venus {
    pub fn new(rt: tokio::runtime::Handle, client: Client, cache: Cache) -> Venus {
        Venus {
            rt,
            client,
            cache,
            notifier: OnceLock::new(),
            handles: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            break_gen: Mutex::new(HashMap::new()),
            negatives: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            counters: Counters::default(),
        }
    }

    fn stripe(&self, fid: Fid) -> &tokio::sync::Mutex<()> {
        &self.stripes[(fid.0 as usize) % STRIPES]
    }

    fn gen(&self, fid: Fid) -> u64 {
        self.break_gen.lock().unwrap().get(&fid).copied().unwrap_or(0)
    }

    pub fn is_open(&self, fid: Fid) -> bool {
        self.opened.lock().unwrap().contains_key(&fid)
    }

    /// Kernel TTL for a node.
    fn ttl(&self, n: &Node) -> Duration {
        if !n.current() {
            return SHORT_TTL;
        }
        if n.attr.kind == FileKind::File && (n.dirty || self.is_open(n.attr.fid)) {
            // Sizes and times come from the container while it is written.
            return Duration::ZERO;
        }
        let left = (n.expires - now_secs()).max(0) as u64;
        LONG_TTL.min(Duration::from_secs(left))
    }

    /// A node's attributes as the kernel should see them: an open or dirty
    /// file's size and times come from its container.
    fn visible_attr(&self, n: &Node) -> Attr {
        let mut a = n.attr.clone();
        if a.kind == FileKind::File && (n.dirty || self.is_open(a.fid)) {
            let meta = match self.opened.lock().unwrap().get(&a.fid) {
                Some((_, s)) => s.file.metadata().ok(),
                None => std::fs::metadata(self.cache.container_path(a.fid)).ok(),
            };
            if let Some(m) = meta {
                a.size = m.len();
                a.mtime = Timestamp { secs: m.mtime(), nanos: m.mtime_nsec() as u32 };
                a.ctime = Timestamp { secs: m.ctime(), nanos: m.ctime_nsec() as u32 };
            }
        }
        a
    }

    // ---- reads ---------------------------------------------------------------------

    pub fn getattr(&self, fid: Fid) -> Result<(Attr, Duration)> {
        if let Some(Some(r)) = self.cache.view(fid, |n| n.current().then(|| (self.visible_attr(n), self.ttl(n)))) {
            self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(r);
        }
        let gen = self.gen(fid);
        let r = self.rt.block_on(self.client.getattr(GetAttrReq { fid }))?;
        let promise = if self.gen(fid) == gen { promise_exp(r.promise) } else { None };
        self.cache.learn(fid, r.attr, None, promise);
        let n = self.cache.get(fid).ok_or_else(|| errno(libc::EIO, "node vanished"))?;
        Ok((self.visible_attr(&n), self.ttl(&n)))
    }

    /// A directory's entries, from the cache while its promise holds.
    pub fn listing(&self, dir: Fid) -> Result<BTreeMap<String, (Fid, FileKind)>> {
        if let Some(n) = self.cache.get(dir) {
            if n.attr.kind != FileKind::Dir {
                return Err(FsError::NotDir.into());
            }
            if n.current() {
                if let Some(e) = n.entries {
                    self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(e);
                }
            }
        }
        self.rt.block_on(async {
            let _g = self.stripe(dir).lock().await;
            if let Some(n) = self.cache.get(dir) {
                if let (true, Some(e)) = (n.current(), n.entries) {
                    return Ok(e);
                }
            }
            let gen = self.gen(dir);
            let r = self.client.readdir(ReadDirReq { dir }).await?;
            let entries: BTreeMap<String, (Fid, FileKind)> =
                r.entries.into_iter().map(|e| (e.name, (e.fid, e.kind))).collect();
            let promise = if self.gen(dir) == gen { promise_exp(r.promise) } else { None };
            self.cache.learn(dir, r.attr, None, promise);
            self.cache.update(dir, |n| n.entries = Some(entries.clone()));
            for (name, (fid, _)) in &entries {
                self.cache.update(*fid, |n| n.parent = Some((dir, name.clone())));
            }
            self.negatives.lock().unwrap().remove(&dir);
            Ok(entries)
        })
    }

    /// A name in a cached, current listing: `None` when the listing must
    /// be fetched first; `Some(None)` for a name that does not exist.
    fn cached_entry(&self, dir: Fid, name: &str) -> Option<Option<Fid>> {
        self.cache
            .view(dir, |n| match (&n.entries, n.current()) {
                (Some(e), true) => Some(e.get(name).map(|(f, _)| *f)),
                _ => None,
            })
            .flatten()
    }

    pub fn lookup(&self, dir: Fid, name: &std::ffi::OsStr) -> Result<Found> {
        let name = name_str(name)?;
        common::error::validate_name(name)?;
        let found = match self.cached_entry(dir, name) {
            Some(f) => f,
            None => {
                let entries = self.listing(dir)?;
                match self.cached_entry(dir, name) {
                    Some(f) => f,
                    // Listing fetched but no promise on it: answer, cache nothing.
                    None => match entries.get(name) {
                        Some((f, _)) => Some(*f),
                        None => return Ok(Found::Negative(Duration::ZERO)),
                    },
                }
            }
        };
        let Some(fid) = found else {
            let mut neg = self.negatives.lock().unwrap();
            let set = neg.entry(dir).or_default();
            if set.len() >= MAX_NEGATIVES && !set.contains(name) {
                return Ok(Found::Negative(Duration::ZERO));
            }
            set.insert(name.to_string());
            let ttl = self.cache.view(dir, |n| self.ttl(n)).unwrap_or(Duration::ZERO);
            return Ok(Found::Negative(ttl));
        };
        if let Some(Some(r)) = self.cache.view(fid, |n| n.current().then(|| (self.visible_attr(n), self.ttl(n)))) {
            self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Found::Entry(r.0, r.1));
        }
        let gen = self.gen(fid);
        let r = self.rt.block_on(self.client.lookup(LookupReq { dir, name: name.to_string() }))?;
        let fid = r.attr.fid;
        let promise = if self.gen(fid) == gen { promise_exp(r.promise) } else { None };
        self.cache.learn(fid, r.attr, Some((dir, name.to_string())), promise);
        let n = self.cache.get(fid).ok_or_else(|| errno(libc::EIO, "node vanished"))?;
        Ok(Found::Entry(self.visible_attr(&n), self.ttl(&n)))
    }

    pub fn readlink(&self, fid: Fid) -> Result<String> {
        if let Some(n) = self.cache.get(fid) {
            if let (true, Some(t)) = (n.current(), n.target.clone()) {
                return Ok(t);
            }
        }
        let gen = self.gen(fid);
        let r = self.rt.block_on(self.client.fetch(FetchReq { fid, inline_max: 8192 }))?;
        let target = String::from_utf8(r.data).map_err(|_| errno(libc::EIO, "symlink target is not UTF-8"))?;
        let promise = if self.gen(fid) == gen { promise_exp(r.promise) } else { None };
        self.cache.learn(fid, r.attr, None, promise);
        self.cache.update(fid, |n| n.target = Some(target.clone()));
        Ok(target)
    }

    pub fn statfs(&self) -> Result<FsStats> {
        Ok(self.rt.block_on(self.client.statfs(StatFsReq {}))?)
    }

    // ---- open, close, store ----------------------------------------------------------

    /// Makes sure the container holds the current content of `fid`
    /// (fetching it whole if needed); returns the node.
    async fn ensure_content(&self, fid: Fid, truncate: bool) -> Result<Node> {
        if let Some(n) = self.cache.get(fid) {
            if n.current() && (n.cached || n.dirty) {
                self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(n);
            }
        }
        let _g = self.stripe(fid).lock().await;
        if let Some(n) = self.cache.get(fid) {
            if n.current() && (n.cached || n.dirty) {
                return Ok(n);
            }
            if n.dirty {
                // Local changes not yet stored: they are the newest content
                // this client has; never replace them with a fetch.
                return Ok(n);
            }
        }
        let gen = self.gen(fid);
        let tmp = self.cache.temp_path(fid);
        let file = Arc::new(std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp)?);
        let result = if truncate {
            // O_TRUNC: the old content does not matter, only its version.
            self.client.getattr(GetAttrReq { fid }).await.map(|r| (r.attr, r.promise))
        } else {
            self.counters.fetches.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let r = fetch_to_file(&self.client, fid, file.clone()).await.map(|r| (r.attr, r.promise));
            if let Ok((a, _)) = &r {
                tracing::debug!(%fid, bytes = a.size, elapsed = ?started.elapsed(), "fetched");
            }
            r
        };
        let (attr, promise) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.into());
            }
        };
        if attr.kind != FileKind::File {
            let _ = std::fs::remove_file(&tmp);
            return Err(FsError::IsDir.into());
        }
        let path = self.cache.container_path(fid);
        std::fs::rename(&tmp, &path)?;
        let meta = file.metadata()?;
        let promise = if self.gen(fid) == gen { promise_exp(promise) } else { None };
        self.cache.learn(fid, attr, None, promise);
        self.cache.update(fid, |n| {
            n.cached = true;
            n.dirty = false;
            n.clean = Some(ContainerStamp::of(&meta));
        });
        self.cache.set_size(fid, meta.len());
        self.cache.touch(fid);
        self.evict_to_limit();
        self.cache.get(fid).ok_or_else(|| errno(libc::EIO, "node vanished"))
    }

    /// Opens `fid`; returns the handle and the shared state (for passthrough).
    pub fn open(&self, fid: Fid, flags: i32) -> Result<(u64, Arc<Shared>)> {
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let truncate = write && flags & libc::O_TRUNC != 0;
        let node = self.rt.block_on(self.ensure_content(fid, truncate))?;
        if node.attr.kind != FileKind::File {
            return Err(FsError::IsDir.into());
        }
        self.cache.touch(fid);
        let shared = {
            let mut opened = self.opened.lock().unwrap();
            match opened.get_mut(&fid) {
                Some((count, s)) => {
                    *count += 1;
                    s.clone()
                }
                None => {
                    let file =
                        std::fs::OpenOptions::new().read(true).write(true).open(self.cache.container_path(fid))?;
                    let meta = file.metadata()?;
                    // A dirty container is out of step with the server by definition.
                    let synced = if node.dirty {
                        ContainerStamp::default()
                    } else {
                        node.clean.unwrap_or_else(|| ContainerStamp::of(&meta))
                    };
                    let s = Arc::new(Shared {
                        fid,
                        file: Arc::new(file),
                        base: Mutex::new(node.attr.version.clone()),
                        synced: Mutex::new(synced),
                        backing: Mutex::new(None),
                    });
                    opened.insert(fid, (1, s.clone()));
                    s
                }
            }
        };
        if truncate {
            shared.file.set_len(0)?;
            self.mark_dirty(fid);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, OpenFile { shared: shared.clone(), write });
        Ok((fh, shared))
    }

    fn mark_dirty(&self, fid: Fid) {
        self.cache.update(fid, |n| n.dirty = true);
    }

    pub fn handle(&self, fh: u64) -> Result<Arc<Shared>> {
        self.handles
            .lock()
            .unwrap()
            .get(&fh)
            .map(|h| h.shared.clone())
            .ok_or_else(|| errno(libc::EBADF, "unknown handle"))
    }

    /// Stores the file if its container changed since it was last in step
    /// with the server. Returns once the server has it (AFS close semantics).
    pub fn flush(&self, fh: u64) -> Result<()> {
        let (shared, write) = match self.handles.lock().unwrap().get(&fh) {
            Some(h) => (h.shared.clone(), h.write),
            None => return Ok(()),
        };
        if !write && !self.cache.get(shared.fid).is_some_and(|n| n.dirty) {
            return Ok(());
        }
        self.rt.block_on(self.store_shared(&shared))
    }

    async fn store_shared(&self, shared: &Shared) -> Result<()> {
        let fid = shared.fid;
        let _g = self.stripe(fid).lock().await;
        let meta = shared.file.metadata()?;
        let now = ContainerStamp::of(&meta);
        if *shared.synced.lock().unwrap() == now && !self.cache.get(fid).is_some_and(|n| n.dirty) {
            return Ok(());
        }
        self.mark_dirty(fid);
        let base = shared.base.lock().unwrap().clone();
        let mtime = Some(now.mtime);
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        match store_from_file(&self.client, fid, base, shared.file.clone(), mtime, None).await {
            Ok(reply) => {
                let after = ContainerStamp::of(&shared.file.metadata()?);
                *shared.base.lock().unwrap() = reply.attr.version.clone();
                let written_since = after != now;
                *shared.synced.lock().unwrap() = if written_since { ContainerStamp::default() } else { after };
                let same_container =
                    std::fs::metadata(self.cache.container_path(fid)).map(|m| m.ino() == after.ino).unwrap_or(false);
                if same_container {
                    let promise = promise_exp(reply.promise);
                    self.cache.update(fid, |n| {
                        n.attr = reply.attr;
                        if let Some(exp) = promise {
                            n.valid = true;
                            n.expires = exp;
                        }
                        n.cached = true;
                        n.dirty = written_since;
                        n.clean = if written_since { None } else { Some(after) };
                    });
                    self.cache.set_size(fid, after.size);
                }
                Ok(())
            }
            Err(e) if e.is_transport() => {
                // The content is safe in the container and marked dirty;
                // the background retrier stores it when the server is back.
                tracing::warn!(%fid, path = %self.cache.path_of(fid), "store deferred, server unreachable: {e}");
                let _ = self.cache.flush();
                Ok(())
            }
            Err(RpcError::Fs(FsError::Conflict(server))) => {
                let saved = self.save_conflict_copy(shared)?;
                tracing::error!(%fid, path = %self.cache.path_of(fid), server_version = %server.version,
                    "store conflict: the file changed on the server; local content kept in {}", saved.display());
                self.cache.update(fid, |n| {
                    n.dirty = false;
                    n.cached = false;
                    n.valid = false;
                });
                Err(FsError::Conflict(server).into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Keeps a copy of local content the server refused, so nothing is lost.
    fn save_conflict_copy(&self, shared: &Shared) -> Result<std::path::PathBuf> {
        let dir = self.cache.dir.join("conflicts");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}-{}", shared.fid.0, now_secs()));
        let mut out = File::create(&path)?;
        let mut src = shared.file.as_ref();
        std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0))?;
        std::io::copy(&mut src, &mut out)?;
        out.sync_all()?;
        Ok(path)
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        let shared = self.handle(fh)?;
        shared.file.sync_all()?;
        self.rt.block_on(self.store_shared(&shared))
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(h) = self.handles.lock().unwrap().remove(&fh) else { return Ok(()) };
        let fid = h.shared.fid;
        let result = if h.write { self.rt.block_on(self.store_shared(&h.shared)) } else { Ok(()) };
        let mut opened = self.opened.lock().unwrap();
        if let Some((count, _)) = opened.get_mut(&fid) {
            *count -= 1;
            if *count == 0 {
                opened.remove(&fid);
            }
        }
        drop(opened);
        if !self.cache.contains(fid) {
            // Removed while open: the container goes now.
            let _ = std::fs::remove_file(self.cache.container_path(fid));
            self.cache.drop_size(fid);
        }
        result
    }

    /// Reads and writes for handles the kernel does not pass through.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let s = self.handle(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match s.file.read_at(&mut buf[got..], offset + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        use std::os::unix::fs::FileExt;
        let s = self.handle(fh)?;
        s.file.write_all_at(data, offset)?;
        Ok(data.len() as u32)
    }

    // ---- namespace changes ---------------------------------------------------------

    fn after_dir_change(&self, dir: Fid, dir_attr: Attr, add: Option<(&str, Fid, FileKind)>, remove: Option<&str>) {
        let keep_valid = self.cache.get(dir).is_some_and(|n| n.current());
        self.cache.update(dir, |n| {
            if let Some(entries) = n.entries.as_mut() {
                if let Some(name) = remove {
                    entries.remove(name);
                }
                if let Some((name, fid, kind)) = add {
                    entries.insert(name.to_string(), (fid, kind));
                }
            }
            n.attr = dir_attr;
            if !keep_valid {
                n.entries = None;
            }
        });
        if let Some((name, _, _)) = add {
            if let Some(set) = self.negatives.lock().unwrap().get_mut(&dir) {
                set.remove(name);
            }
        }
    }

    fn learn_new(&self, dir: Fid, name: &str, e: &NewEntry) {
        self.cache.learn(e.attr.fid, e.attr.clone(), Some((dir, name.to_string())), promise_exp(e.promise));
        self.after_dir_change(dir, e.dir.clone(), Some((name, e.attr.fid, e.attr.kind)), None);
    }

    /// Creates and opens a file.
    pub fn create(&self, dir: Fid, name: &std::ffi::OsStr, mode: u32, flags: i32) -> Result<(Attr, u64, Arc<Shared>)> {
        let name = name_str(name)?;
        let exclusive = flags & libc::O_EXCL != 0;
        let e = self.rt.block_on(self.client.create(CreateReq {
            dir,
            name: name.to_string(),
            mode: mode & 0o7777,
            exclusive,
        }))?;
        let fid = e.attr.fid;
        self.learn_new(dir, name, &e);
        if e.attr.size == 0 && !self.cache.get(fid).is_some_and(|n| n.cached || n.dirty) {
            // A new, empty file: its content is known without a fetch.
            let path = self.cache.container_path(fid);
            let f = File::create(&path)?;
            let meta = f.metadata()?;
            self.cache.update(fid, |n| {
                n.cached = true;
                n.clean = Some(ContainerStamp::of(&meta));
            });
            self.cache.set_size(fid, 0);
        }
        let (fh, shared) = self.open(fid, flags & !libc::O_CREAT & !libc::O_EXCL)?;
        let n = self.cache.get(fid).ok_or_else(|| errno(libc::EIO, "node vanished"))?;
        Ok((self.visible_attr(&n), fh, shared))
    }

    pub fn mkdir(&self, dir: Fid, name: &std::ffi::OsStr, mode: u32) -> Result<Attr> {
        let name = name_str(name)?;
        let e = self.rt.block_on(self.client.mkdir(MkdirReq { dir, name: name.to_string(), mode: mode & 0o7777 }))?;
        self.learn_new(dir, name, &e);
        self.cache.update(e.attr.fid, |n| n.entries = Some(BTreeMap::new()));
        Ok(e.attr)
    }

    pub fn symlink(&self, dir: Fid, name: &std::ffi::OsStr, target: &std::path::Path) -> Result<Attr> {
        let name = name_str(name)?;
        let target = target.to_str().ok_or_else(|| errno(libc::EINVAL, "targets must be UTF-8"))?.to_string();
        let e = self.rt.block_on(self.client.symlink(SymlinkReq {
            dir,
            name: name.to_string(),
            target: target.clone(),
        }))?;
        self.learn_new(dir, name, &e);
        self.cache.update(e.attr.fid, |n| n.target = Some(target));
        Ok(e.attr)
    }

    pub fn link(&self, fid: Fid, dir: Fid, name: &std::ffi::OsStr) -> Result<Attr> {
        let name = name_str(name)?;
        let e = self.rt.block_on(self.client.link(LinkReq { fid, dir, name: name.to_string() }))?;
        self.learn_new(dir, name, &e);
        Ok(e.attr)
    }

    pub fn unlink(&self, dir: Fid, name: &std::ffi::OsStr, is_dir: bool) -> Result<()> {
        let name = name_str(name)?;
        let victim = self.listing(dir).ok().and_then(|e| e.get(name).map(|(f, _)| *f));
        let r = if is_dir {
            self.rt.block_on(self.client.rmdir(RmdirReq { dir, name: name.to_string() }))?
        } else {
            self.rt.block_on(self.client.remove(RemoveReq { dir, name: name.to_string(), base: None }))?
        };
        self.after_dir_change(dir, r.dir, None, Some(name));
        if let Some(fid) = victim {
            self.forget_object(fid);
        }
        Ok(())
    }

    /// An object lost a name: other names may remain (hard links), so its
    /// attributes are stale; if nothing holds it open, its cache goes.
    fn forget_object(&self, fid: Fid) {
        let nlink = self.cache.get(fid).map(|n| n.attr.nlink).unwrap_or(1);
        if nlink > 1 || self.is_open(fid) {
            self.cache.update(fid, |n| n.valid = false);
        } else {
            self.cache.remove(fid);
        }
    }

    pub fn rename(
        &self,
        dir: Fid,
        name: &std::ffi::OsStr,
        to_dir: Fid,
        to_name: &std::ffi::OsStr,
        flags: u32,
    ) -> Result<()> {
        let (name, to_name) = (name_str(name)?, name_str(to_name)?);
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(errno(libc::EINVAL, "RENAME_EXCHANGE is not supported"));
        }
        let replaced = self.listing(to_dir).ok().and_then(|e| e.get(to_name).map(|(f, _)| *f));
        let r = self.rt.block_on(self.client.rename(RenameReq {
            from_dir: dir,
            from_name: name.to_string(),
            to_dir,
            to_name: to_name.to_string(),
            no_replace: flags & libc::RENAME_NOREPLACE != 0,
        }))?;
        let moved = r.moved.fid;
        if let Some(t) = replaced.filter(|t| *t != moved) {
            self.forget_object(t);
        }
        self.after_dir_change(dir, r.from_dir, None, Some(name));
        self.after_dir_change(to_dir, r.to_dir, Some((to_name, moved, r.moved.kind)), None);
        let keep = self.cache.get(moved).is_some_and(|n| n.current());
        self.cache.learn(moved, r.moved, Some((to_dir, to_name.to_string())), None);
        if !keep {
            self.cache.update(moved, |n| n.valid = false);
        }
        Ok(())
    }

    pub fn setattr(&self, fid: Fid, set: SetAttr, fh: Option<u64>) -> Result<(Attr, Duration)> {
        let open = fh
            .and_then(|fh| self.handle(fh).ok())
            .or_else(|| self.opened.lock().unwrap().get(&fid).map(|(_, s)| s.clone()));
        let r = self.rt.block_on(async {
            let _g = self.stripe(fid).lock().await;
            self.client.setattr(SetAttrReq { fid, set: set.clone(), base: None }).await
        })?;
        // Apply the same change to the local copy, so a later store agrees.
        let container = match &open {
            Some(s) => Some(s.file.clone()),
            None if self.cache.get(fid).is_some_and(|n| n.cached || n.dirty) => {
                std::fs::OpenOptions::new().write(true).open(self.cache.container_path(fid)).ok().map(Arc::new)
            }
            None => None,
        };
        if let Some(f) = container {
            if let Some(size) = set.size {
                f.set_len(size)?;
            }
            if set.mtime.is_some() || set.atime.is_some() {
                let mut t = std::fs::FileTimes::new();
                if let Some(m) = set.mtime {
                    t = t.set_modified(m.into());
                }
                if let Some(a) = set.atime {
                    t = t.set_accessed(a.into());
                }
                f.set_times(t)?;
            }
            let stamp = ContainerStamp::of(&f.metadata()?);
            if let Some(s) = &open {
                *s.base.lock().unwrap() = r.attr.version.clone();
                let mut synced = s.synced.lock().unwrap();
                if *synced != ContainerStamp::default() {
                    *synced = stamp;
                }
            }
            let dirty = self.cache.get(fid).is_some_and(|n| n.dirty);
            self.cache.learn(fid, r.attr.clone(), None, promise_exp(r.promise));
            self.cache.update(fid, |n| {
                n.cached = true;
                if !dirty {
                    n.clean = Some(stamp);
                }
            });
            self.cache.set_size(fid, stamp.size);
        } else {
            self.cache.learn(fid, r.attr.clone(), None, promise_exp(r.promise));
        }
        let n = self.cache.get(fid).ok_or_else(|| errno(libc::EIO, "node vanished"))?;
        Ok((self.visible_attr(&n), self.ttl(&n)))
    }

    // ---- callbacks and cache maintenance -----------------------------------------------

    /// Handles callback breaks: stale nodes, and kernel caches dropped.
    pub fn on_break(&self, fids: &[Fid]) {
        let mut inval_entries = Vec::new();
        {
            let mut gens = self.break_gen.lock().unwrap();
            for &fid in fids {
                *gens.entry(fid).or_insert(0) += 1;
            }
        }
        for &fid in fids {
            let names: Vec<String> = self
                .cache
                .update(fid, |n| {
                    n.valid = false;
                    n.entries.take().map(|e| e.into_keys().collect()).unwrap_or_default()
                })
                .unwrap_or_default();
            let negs = self.negatives.lock().unwrap().remove(&fid).unwrap_or_default();
            for name in names.into_iter().chain(negs) {
                inval_entries.push((fid, name));
            }
        }
        tracing::debug!(?fids, "callback break");
        if let Some(notifier) = self.notifier.get() {
            for &fid in fids {
                let _ = notifier.inval_inode(fuser::INodeNo(fid.0), 0, 0);
            }
            for (dir, name) in inval_entries {
                let _ = notifier.inval_entry(fuser::INodeNo(dir.0), std::ffi::OsStr::new(&name));
            }
        }
    }

    /// Everything may be stale: validate the whole cache in one call.
    pub async fn revalidate_all(&self) -> Result<(usize, usize)> {
        let nodes = self.cache.all();
        let items: Vec<(Fid, VersionVector)> =
            nodes.iter().filter(|(_, n)| !n.dirty).map(|(f, n)| (*f, n.attr.version.clone())).collect();
        let mut current = 0;
        let mut stale = Vec::new();
        for chunk in items.chunks(50_000) {
            let r = self.client.validate(ValidateReq { items: chunk.to_vec() }).await?;
            for ((fid, _), ok) in chunk.iter().zip(r.current) {
                if ok {
                    current += 1;
                    let exp = r.promise.map(|p| p.expires).unwrap_or(0);
                    self.cache.update(*fid, |n| {
                        n.valid = true;
                        n.expires = exp;
                    });
                } else {
                    stale.push(*fid);
                }
            }
        }
        let n_stale = stale.len();
        self.on_break(&stale);
        Ok((current, n_stale))
    }

    /// Evicts least recently used clean, closed containers until the cache
    /// fits its limit.
    pub fn evict_to_limit(&self) {
        if self.cache.bytes() <= self.cache.limit {
            return;
        }
        for (fid, size) in self.cache.eviction_order(&|f| self.is_open(f)) {
            if self.cache.bytes() <= self.cache.limit {
                break;
            }
            let _ = std::fs::remove_file(self.cache.container_path(fid));
            self.cache.drop_size(fid);
            self.cache.update(fid, |n| {
                n.cached = false;
                n.clean = None;
            });
            tracing::debug!(%fid, size, "evicted");
        }
    }

    /// Drops cached content of clean, closed files (all, or under `under`).
    pub fn flush_cache(&self, under: Option<Fid>) -> (usize, u64) {
        let (mut n, mut bytes) = (0, 0);
        for (fid, size) in self.cache.eviction_order(&|f| self.is_open(f)) {
            if let Some(top) = under {
                if !self.cache.is_within(fid, top) {
                    continue;
                }
            }
            let _ = std::fs::remove_file(self.cache.container_path(fid));
            self.cache.drop_size(fid);
            self.cache.update(fid, |n| {
                n.cached = false;
                n.clean = None;
            });
            n += 1;
            bytes += size;
        }
        (n, bytes)
    }

    /// Stores every dirty file that is not open (retries deferred stores).
    pub async fn store_dirty(&self) -> usize {
        let mut stored = 0;
        for (fid, n) in self.cache.all() {
            if !n.dirty || self.is_open(fid) {
                continue;
            }
            let file = match std::fs::OpenOptions::new().read(true).write(true).open(self.cache.container_path(fid)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(%fid, "dirty file has no container: {e}");
                    continue;
                }
            };
            let shared = Shared {
                fid,
                file: Arc::new(file),
                base: Mutex::new(n.attr.version.clone()),
                synced: Mutex::new(ContainerStamp::default()),
                backing: Mutex::new(None),
            };
            match self.store_shared(&shared).await {
                Ok(()) if !self.cache.get(fid).is_some_and(|n| n.dirty) => stored += 1,
                Ok(()) => {}
                Err(e) => tracing::warn!(%fid, "retrying a deferred store failed: {e}"),
            }
        }
        stored
    }

    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap().len()
    }
}

impl From<VenusError> for fuser::Errno {
    fn from(e: VenusError) -> Self {
        crate::errors::ToErrno::errno(&e)
    }
}
