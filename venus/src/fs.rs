//! The cache manager's operations, independent of FUSE's calling style.
//!
//! Each operation answers from the cache when the object's callback promise
//! holds, and asks the server otherwise. Whole files are fetched into
//! container files on open and stored back whole when a modified file is
//! closed (flush). Callback breaks from the server mark objects stale and
//! invalidate the kernel's caches of them.
//!
//! While disconnected (see `link.rs`) reads are served from whatever is
//! cached and changes go to the modification log (`offline.rs`).

use crate::cache::{now_secs, Cache, ContainerStamp, Node};
use crate::cml::{Cml, CmlOp};
use crate::conflicts::Conflicts;
use crate::errors::{errno, Result, VenusError};
use crate::link::Link;
use common::proto::*;
use common::rpc::{fetch_to_file, Client, RpcError};
use common::{Attr, Fid, FileKind, FsError, FsStats, SetAttr, Timestamp, VersionVector};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    pub fid: Mutex<Fid>,
    pub file: Arc<File>,
    pub base: Mutex<VersionVector>,
    /// The container's state when last in step with the server (or the log).
    pub synced: Mutex<ContainerStamp>,
    /// The kernel's passthrough registration, kept while any handle is open.
    pub backing: Mutex<Option<fuser::BackingId>>,
    /// Handles open for writing. While there are any, the container's size
    /// and times are the file's, and the kernel may not keep them.
    pub writers: AtomicUsize,
    /// Held through a close's store (for a new file: its create, then the
    /// store). Two closes of one open file can come at once: a forked child
    /// closing its inherited copy of the descriptor at `exec` while the
    /// parent closes its own. The second then waits for the first, instead
    /// of storing while the first renumbers the new file, based on the
    /// version from before the create (a conflict with itself: EIO).
    storing: tokio::sync::Mutex<()>,
}

impl Shared {
    /// The state of `fid`'s container `file`, based on version `base` and
    /// last in step with the server (or the log) at `synced`; no handles yet.
    fn new(fid: Fid, file: File, base: VersionVector, synced: ContainerStamp) -> Shared {
        Shared {
            fid: Mutex::new(fid),
            file: Arc::new(file),
            base: Mutex::new(base),
            synced: Mutex::new(synced),
            backing: Mutex::new(None),
            writers: AtomicUsize::new(0),
            storing: tokio::sync::Mutex::new(()),
        }
    }

    pub fn fid(&self) -> Fid {
        *self.fid.lock().unwrap()
    }
}

pub struct OpenFile {
    pub shared: Arc<Shared>,
    pub write: bool,
}

/// Whether `open(2)` flags give a handle that may write: only such a handle
/// stores its file on close.
pub fn opens_for_writing(flags: i32) -> bool {
    let acc = flags & libc::O_ACCMODE;
    acc == libc::O_WRONLY || acc == libc::O_RDWR
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
    pub cml: Cml,
    pub conflicts: Conflicts,
    pub link: Link,
    pub notifier: OnceLock<fuser::Notifier>,
    /// Where the volume is mounted (to turn CLI paths into volume paths).
    pub mountpoint: std::path::PathBuf,
    handles: Mutex<HashMap<u64, OpenFile>>,
    /// The shared open state of each open file.
    pub(crate) opened: Mutex<HashMap<Fid, (usize, Arc<Shared>)>>,
    /// Opens under way, by fid (see `Opening`).
    opening: Mutex<HashMap<Fid, usize>>,
    next_fh: AtomicU64,
    /// Bumped by every break, so a fetch can tell a break raced with it.
    break_gen: Mutex<HashMap<Fid, u64>>,
    negatives: Mutex<HashMap<Fid, HashSet<String>>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    /// Local fids of objects created offline -> their server fids, for
    /// inode numbers the kernel still uses.
    aliases: Mutex<HashMap<Fid, Fid>>,
    aliases_tree: sled::Tree,
    /// Last statfs answer, for statfs while offline.
    last_statfs: Mutex<Option<FsStats>>,
    pub hoard: crate::hoard::Hoard,
    /// One hoard walk at a time.
    pub(crate) walk_lock: Mutex<()>,
    pub last_walk: Mutex<Option<crate::hoard::Summary>>,
    pub counters: Counters,
    /// Files whose server create waits for their first close (`deferred.rs`).
    pub(crate) deferred: Mutex<HashMap<Fid, crate::deferred::Deferred>>,
    /// Deferred creates the server refused, still open: local fid -> the
    /// conflict that keeps their content.
    pub(crate) refused: Mutex<HashMap<Fid, u64>>,
    /// Tests: `VENUS_FAILPOINT` names a point where venus pauses, to open a
    /// race's window wide (see `failpoint`).
    failpoint: Option<String>,
}

pub(crate) fn name_str(name: &std::ffi::OsStr) -> Result<&str> {
    name.to_str().ok_or_else(|| errno(libc::EINVAL, "names must be UTF-8"))
}

pub(crate) fn promise_exp(p: Option<Promise>) -> Option<i64> {
    p.map(|p| p.expires)
}

impl Venus {
    pub fn new(
        rt: tokio::runtime::Handle,
        client: Client,
        cache: Cache,
        link: Link,
        mountpoint: std::path::PathBuf,
    ) -> Result<Venus> {
        let cml = Cml::open(cache.db())?;
        let conflicts = Conflicts::open(cache.db(), &cache.dir)?;
        let aliases_tree = cache.db().open_tree("aliases")?;
        let hoard = crate::hoard::Hoard::open(cache.db())?;
        let aliases = aliases_tree
            .iter()
            .flatten()
            .map(|(k, v)| (Fid(crate::cache::be(&k)), Fid(crate::cache::be(&v))))
            .collect();
        let venus = Venus {
            rt,
            client,
            cache,
            cml,
            conflicts,
            link,
            notifier: OnceLock::new(),
            mountpoint,
            handles: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
            opening: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            break_gen: Mutex::new(HashMap::new()),
            negatives: Mutex::new(HashMap::new()),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            aliases: Mutex::new(aliases),
            aliases_tree,
            last_statfs: Mutex::new(None),
            hoard,
            walk_lock: Mutex::new(()),
            last_walk: Mutex::new(None),
            counters: Counters::default(),
            deferred: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            failpoint: std::env::var("VENUS_FAILPOINT").ok(),
        };
        venus.recover()?;
        Ok(venus)
    }

    /// Completes what a crash cut short: objects whose server fid was
    /// learnt (the alias is written first) but whose cache record, log
    /// records or container still use the local fid. Then reconciles the
    /// containers with the index, keeping every one the log needs.
    fn recover(&self) -> Result<()> {
        let aliases = self.aliases.lock().unwrap().clone();
        for (local, server) in &aliases {
            if self.cache.contains(*local) {
                tracing::info!(%local, %server, "finishing the renumbering of an object created offline");
                self.cache.renumber(*local, *server);
            }
        }
        self.cml.remap_all(&aliases)?;
        self.log_interrupted_creates()?;
        let keep: HashSet<Fid> = self.cml.records().iter().flat_map(|r| r.op.fids()).collect();
        self.cache.scan_containers(&keep)?;
        self.cache.flush()
    }

    /// Tests: pauses this thread for half a second at the point `at` if
    /// `VENUS_FAILPOINT` names it (`VENUS_FAILPOINT_MS` sets another
    /// length, for windows that must outlast a reconnection).
    pub(crate) fn failpoint(&self, at: &str) {
        if self.failpoint.as_deref() == Some(at) {
            let ms = std::env::var("VENUS_FAILPOINT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
            tracing::warn!("failpoint {at}: pausing {ms} ms");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }

    pub(crate) fn stripe(&self, fid: Fid) -> &tokio::sync::Mutex<()> {
        &self.stripes[(fid.0 as usize) % STRIPES]
    }

    /// Makes a listing or attributes fetched before now unfit to keep a
    /// promise (as a break does).
    pub(crate) fn bump_gen(&self, fid: Fid) {
        *self.break_gen.lock().unwrap().entry(fid).or_insert(0) += 1;
    }

    fn gen(&self, fid: Fid) -> u64 {
        self.break_gen.lock().unwrap().get(&fid).copied().unwrap_or(0)
    }

    /// The object an inode number names now (a local fid may have become a
    /// server fid through reintegration).
    pub fn resolve(&self, fid: Fid) -> Fid {
        if fid.is_local() {
            if let Some(f) = self.aliases.lock().unwrap().get(&fid) {
                return *f;
            }
        }
        fid
    }

    /// The volume path of `name` in `dir`.
    pub(crate) fn path_in(&self, dir: Fid, name: &str) -> String {
        match self.cache.path_of(self.resolve(dir)) {
            p if p == "/" => format!("/{name}"),
            p => format!("{p}/{name}"),
        }
    }

    pub(crate) fn aliases_snapshot(&self) -> HashMap<Fid, Fid> {
        self.aliases.lock().unwrap().clone()
    }

    /// The kernel dropped its inode `fid`. A local fid whose object has its
    /// server fid by now is named by nothing else, so its alias goes: every
    /// file created on close (`deferred.rs`) gets one, and they must not pile up.
    pub fn forget(&self, fid: Fid) {
        if !fid.is_local() || !self.aliases.lock().unwrap().contains_key(&fid) || self.cache.contains(fid) {
            return;
        }
        // A crash before the log's records were renamed needs it at start-up.
        if self.cml.any(|r| r.op.fids().contains(&fid)) {
            return;
        }
        self.aliases.lock().unwrap().remove(&fid);
        let _ = self.aliases_tree.remove(fid.0.to_be_bytes());
    }

    pub(crate) fn add_alias(&self, local: Fid, server: Fid) -> Result<()> {
        self.aliases.lock().unwrap().insert(local, server);
        self.aliases_tree.insert(local.0.to_be_bytes(), &server.0.to_be_bytes())?;
        Ok(())
    }

    pub fn is_open(&self, fid: Fid) -> bool {
        self.opened.lock().unwrap().contains_key(&fid)
    }

    /// Marks `fid` as being opened until the guard goes (see `Opening`).
    pub(crate) fn begin_open(&self, fid: Fid) -> Opening<'_> {
        *self.opening.lock().unwrap().entry(fid).or_insert(0) += 1;
        Opening { venus: self, fid }
    }

    /// Whether a handle holds `fid` or an open of it is under way: what
    /// the sweeps that act on files nobody holds must ask. (`opening`
    /// first: an open leaves it only once `opened` has it.)
    pub(crate) fn is_open_or_opening(&self, fid: Fid) -> bool {
        self.opening.lock().unwrap().contains_key(&fid) || self.is_open(fid)
    }

    /// `fid`'s open container, and whether its size and times are the
    /// file's rather than the node's: while a handle may be writing it, or
    /// while it holds an older version than the node (its readers keep
    /// that copy until the last close, so they must see its size).
    fn open_container(&self, fid: Fid, n: &Node) -> Option<(Arc<File>, bool)> {
        let opened = self.opened.lock().unwrap();
        let (_, s) = opened.get(&fid)?;
        let truth = s.writers.load(Ordering::Relaxed) > 0 || *s.base.lock().unwrap() != n.attr.version;
        Some((s.file.clone(), truth))
    }

    /// Runs a server request while connected. A transport failure takes
    /// venus offline and is reported as `Offline`, so callers fall back to
    /// the cache or the log.
    pub(crate) async fn remote<T>(&self, f: impl Future<Output = std::result::Result<T, RpcError>>) -> Result<T> {
        if self.link.state() == crate::link::State::Disconnected {
            return Err(VenusError::Offline);
        }
        match f.await {
            Err(e) if e.is_transport() => {
                self.link.lost(format!("a request failed: {e}"));
                Err(VenusError::Offline)
            }
            r => r.map_err(Into::into),
        }
    }

    pub(crate) fn remote_blocking<T>(&self, f: impl Future<Output = std::result::Result<T, RpcError>>) -> Result<T> {
        self.rt.block_on(self.remote(f))
    }

    /// An uncached object asked for while offline: a clear error and a log line.
    pub(crate) fn not_cached(&self, fid: Fid, what: &str) -> VenusError {
        tracing::warn!(path = %self.cache.path_of(fid), what, "not cached, and the server is unreachable");
        VenusError::Offline
    }

    /// Like `not_cached`, naming the object by its directory and name.
    pub(crate) fn not_cached_name(&self, dir: Fid, name: &str) -> VenusError {
        let dir_path = self.cache.path_of(dir);
        let path = if dir_path == "/" { format!("/{name}") } else { format!("{dir_path}/{name}") };
        tracing::warn!(%path, "not cached, and the server is unreachable");
        VenusError::Offline
    }

    /// Kernel TTL for a node.
    pub(crate) fn ttl(&self, n: &Node) -> Duration {
        if !n.current() {
            return if self.link.is_connected() { SHORT_TTL } else { Duration::ZERO };
        }
        if n.attr.kind == FileKind::File
            && (n.dirty || self.open_container(n.attr.fid, n).is_some_and(|(_, truth)| truth))
        {
            // Sizes and times come from the container while it is written,
            // or read at an older version. (Opening the current version for
            // reading changes nothing: a compiler's fstat of each source
            // and header it reads stays in the kernel.)
            return Duration::ZERO;
        }
        let left = (n.expires - now_secs()).max(0) as u64;
        LONG_TTL.min(Duration::from_secs(left))
    }

    /// A node's attributes as the kernel should see them: the size and
    /// times of a dirty file, and of an open one whose container is the
    /// truth (see `open_container`), come from its container.
    pub(crate) fn visible_attr(&self, n: &Node, fid: Fid) -> Attr {
        let mut a = n.attr.clone();
        a.fid = fid;
        if a.kind == FileKind::File {
            let meta = match self.open_container(fid, n) {
                Some((file, truth)) if truth || n.dirty => file.metadata().ok(),
                None if n.dirty => std::fs::metadata(self.cache.container_path(fid)).ok(),
                _ => None,
            };
            if let Some(m) = meta {
                a.size = m.len();
                a.mtime = Timestamp { secs: m.mtime(), nanos: m.mtime_nsec() as u32 };
                a.ctime = Timestamp { secs: m.ctime(), nanos: m.ctime_nsec() as u32 };
            }
        }
        a
    }

    /// Attributes straight from the cache: current ones, or (offline) any.
    fn cached_attr(&self, fid: Fid, any: bool) -> Option<(Attr, Duration)> {
        self.cache.view(fid, |n| (n.current() || any).then(|| (self.visible_attr(n, fid), self.ttl(n)))).flatten()
    }

    // ---- reads ---------------------------------------------------------------------

    pub fn getattr(&self, fid: Fid) -> Result<(Attr, Duration)> {
        let fid = self.resolve(fid);
        if let Some(r) = self.cached_attr(fid, fid.is_local()) {
            self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(r);
        }
        let gen = self.gen(fid);
        match self.remote_blocking(self.client.getattr(GetAttrReq { fid })) {
            Ok(r) => {
                let promise = if self.gen(fid) == gen { promise_exp(r.promise) } else { None };
                self.cache.learn(fid, r.attr, None, promise);
                self.cached_attr(fid, true).ok_or_else(|| errno(libc::EIO, "node vanished after a getattr"))
            }
            Err(VenusError::Offline) => self.cached_attr(fid, true).ok_or_else(|| self.not_cached(fid, "attributes")),
            Err(e) => Err(e),
        }
    }

    /// A directory's entries, from the cache while its promise holds (or,
    /// offline, whatever listing is cached).
    pub fn listing(&self, dir: Fid) -> Result<BTreeMap<String, (Fid, FileKind)>> {
        let dir = self.resolve(dir);
        let cached = self.cache.view(dir, |n| {
            if n.attr.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            // A dirty listing holds logged changes the server lacks.
            Ok((n.current() || dir.is_local() || n.dirty, n.entries.clone()))
        });
        match cached {
            Some(Err(e)) => return Err(e.into()),
            Some(Ok((true, Some(e)))) => {
                self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(e);
            }
            _ => {}
        }
        let fetched = self.rt.block_on(async {
            let _g = self.stripe(dir).lock().await;
            if let Some((true, Some(e))) = self.cache.view(dir, |n| (n.current(), n.entries.clone())) {
                return Ok(e);
            }
            let gen = self.gen(dir);
            let r = self.remote(self.client.readdir(ReadDirReq { dir })).await?;
            let mut entries: BTreeMap<String, (Fid, FileKind)> =
                r.entries.into_iter().map(|e| (e.name, (e.fid, e.kind))).collect();
            // Files created here whose server create waits for their close.
            for (name, fid) in self.deferred_in(dir) {
                entries.insert(name, (fid, FileKind::File));
            }
            let promise = if self.gen(dir) == gen { promise_exp(r.promise) } else { None };
            self.cache.learn(dir, r.attr, None, promise);
            self.cache.update(dir, |n| n.entries = Some(entries.clone()));
            for (name, (fid, _)) in &entries {
                self.cache.update(*fid, |n| n.parent = Some((dir, name.clone())));
            }
            self.negatives.lock().unwrap().remove(&dir);
            Ok(entries)
        });
        match fetched {
            Err(VenusError::Offline) => self
                .cache
                .view(dir, |n| n.entries.clone())
                .flatten()
                .ok_or_else(|| self.not_cached(dir, "directory listing")),
            r => r,
        }
    }

    /// A name in a cached listing usable now: `None` when the listing must
    /// be fetched first; `Some(None)` for a name that does not exist.
    fn cached_entry(&self, dir: Fid, name: &str) -> Option<Option<Fid>> {
        let offline = !self.link.is_connected();
        self.cache
            .view(dir, |n| match (&n.entries, n.current() || offline || dir.is_local()) {
                (Some(e), true) => Some(e.get(name).map(|(f, _)| *f)),
                _ => None,
            })
            .flatten()
    }

    pub fn lookup(&self, dir: Fid, name: &std::ffi::OsStr) -> Result<Found> {
        let dir = self.resolve(dir);
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
            let current = self.cache.view(dir, |n| n.current()).unwrap_or(false);
            if !current {
                return Ok(Found::Negative(Duration::ZERO));
            }
            let mut neg = self.negatives.lock().unwrap();
            let set = neg.entry(dir).or_default();
            if set.len() >= MAX_NEGATIVES && !set.contains(name) {
                return Ok(Found::Negative(Duration::ZERO));
            }
            set.insert(name.to_string());
            let ttl = self.cache.view(dir, |n| self.ttl(n)).unwrap_or(Duration::ZERO);
            return Ok(Found::Negative(ttl));
        };
        let fid = self.resolve(fid);
        if let Some((a, ttl)) = self.cached_attr(fid, fid.is_local()) {
            self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Found::Entry(a, ttl));
        }
        let gen = self.gen(fid);
        match self.remote_blocking(self.client.lookup(LookupReq { dir, name: name.to_string() })) {
            Ok(r) => {
                let fid = r.attr.fid;
                let promise = if self.gen(fid) == gen { promise_exp(r.promise) } else { None };
                self.cache.learn(fid, r.attr, Some((dir, name.to_string())), promise);
                let (a, ttl) =
                    self.cached_attr(fid, true).ok_or_else(|| errno(libc::EIO, "node vanished after a lookup"))?;
                Ok(Found::Entry(a, ttl))
            }
            Err(VenusError::Offline) => {
                let (a, ttl) = self.cached_attr(fid, true).ok_or_else(|| self.not_cached_name(dir, name))?;
                Ok(Found::Entry(a, ttl))
            }
            Err(e) => Err(e),
        }
    }

    pub fn readlink(&self, fid: Fid) -> Result<String> {
        let fid = self.resolve(fid);
        let offline = !self.link.is_connected();
        if let Some(Some(t)) =
            self.cache.view(fid, |n| (n.current() || offline || fid.is_local()).then(|| n.target.clone()).flatten())
        {
            return Ok(t);
        }
        let gen = self.gen(fid);
        match self.remote_blocking(self.client.fetch(FetchReq { fid, inline_max: 8192 })) {
            Ok(r) => {
                let target =
                    String::from_utf8(r.data.to_vec()).map_err(|_| errno(libc::EIO, "symlink target is not UTF-8"))?;
                let promise = if self.gen(fid) == gen { promise_exp(r.promise) } else { None };
                self.cache.learn(fid, r.attr, None, promise);
                self.cache.update(fid, |n| n.target = Some(target.clone()));
                Ok(target)
            }
            Err(VenusError::Offline) => {
                self.cache.view(fid, |n| n.target.clone()).flatten().ok_or_else(|| self.not_cached(fid, "symlink"))
            }
            Err(e) => Err(e),
        }
    }

    pub fn statfs(&self) -> Result<FsStats> {
        match self.remote_blocking(self.client.statfs(StatFsReq {})) {
            Ok(s) => {
                *self.last_statfs.lock().unwrap() = Some(s.clone());
                Ok(s)
            }
            Err(VenusError::Offline) => Ok(self.last_statfs.lock().unwrap().clone().unwrap_or(FsStats {
                blocks: 0,
                bfree: 0,
                bavail: 0,
                files: 0,
                ffree: 0,
                bsize: 4096,
                namelen: 255,
            })),
            Err(e) => Err(e),
        }
    }

    // ---- open, close, store ----------------------------------------------------------

    /// Makes sure the container holds the current content of `fid`
    /// (fetching it whole if needed); returns the node. Offline, whatever is
    /// cached is used.
    async fn ensure_content(&self, fid: Fid, truncate: bool) -> Result<Node> {
        let usable = |n: &Node| (n.cached || n.dirty) && (n.current() || n.dirty || fid.is_local());
        if let Some(n) = self.cache.get(fid).filter(usable) {
            self.counters.local_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(n);
        }
        let _g = self.stripe(fid).lock().await;
        if let Some(n) = self.cache.get(fid).filter(usable) {
            return Ok(n);
        }
        if !self.link.is_connected() {
            return match self.cache.get(fid) {
                Some(n) if n.cached => Ok(n),
                // O_TRUNC needs no old content: an empty container will do.
                Some(n) if truncate && n.attr.kind == FileKind::File => {
                    File::create(self.cache.container_path(fid))?;
                    // Dirty: the server still has the old content.
                    self.cache.update(fid, |n| {
                        n.cached = true;
                        n.dirty = true;
                        n.clean = None;
                    });
                    self.cache.set_size(fid, 0);
                    Ok(Node { cached: true, dirty: true, clean: None, ..n })
                }
                _ => Err(self.not_cached(fid, "file")),
            };
        }
        let gen = self.gen(fid);
        let tmp = self.cache.temp_path(fid);
        let file = Arc::new(std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&tmp)?);
        let result = if truncate {
            // O_TRUNC: the old content does not matter, only its version.
            self.remote(self.client.getattr(GetAttrReq { fid })).await.map(|r| (r.attr, r.promise))
        } else {
            self.counters.fetches.fetch_add(1, Ordering::Relaxed);
            let started = std::time::Instant::now();
            let r = self.remote(fetch_to_file(&self.client, fid, file.clone())).await.map(|r| (r.attr, r.promise));
            if let Ok((a, _)) = &r {
                tracing::debug!(%fid, bytes = a.size, elapsed = ?started.elapsed(), "fetched");
            }
            r
        };
        let (attr, promise) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                if matches!(e, VenusError::Offline) {
                    if let Some(n) = self.cache.get(fid).filter(|n| n.cached) {
                        return Ok(n);
                    }
                    return Err(self.not_cached(fid, "file"));
                }
                return Err(e);
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
            // After O_TRUNC the (empty) container differs from the server's
            // content until stored.
            n.dirty = truncate;
            n.clean = if truncate { None } else { Some(ContainerStamp::of(&meta)) };
        });
        self.cache.set_size(fid, meta.len());
        self.cache.touch(fid);
        self.evict_to_limit();
        self.cache.get(fid).ok_or_else(|| errno(libc::EIO, "node vanished after a fetch"))
    }

    pub(crate) async fn ensure_content_pub(&self, fid: Fid) -> Result<Node> {
        self.ensure_content(fid, false).await
    }

    /// Opens `fid`; returns the handle and the shared state (for passthrough).
    pub fn open(&self, fid: Fid, flags: i32) -> Result<(u64, Arc<Shared>)> {
        let asked = fid;
        let mut evicted = false;
        loop {
            let fid = self.resolve(asked);
            let _opening = self.begin_open(fid);
            match self.open_once(fid, flags) {
                Ok(Some(opened)) => return Ok(opened),
                // Renumbered before the open held it (a file created on
                // close got its server fid): again, under the new fid.
                Ok(None) => continue,
                // Evicted between the check and the open: fetch again.
                Err(VenusError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound && !evicted => {
                    evicted = true;
                    self.cache.update(fid, |n| n.cached = false);
                }
                // Renumbered before its node was looked at (the node was
                // gone from under `fid`): again, under the new fid. Once:
                // a server fid is never renumbered.
                Err(_) if self.resolve(asked) != fid => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens `fid`; `None` if it was renumbered before the stripe was held.
    fn open_once(&self, fid: Fid, flags: i32) -> Result<Option<(u64, Arc<Shared>)>> {
        let write = opens_for_writing(flags);
        let truncate = write && flags & libc::O_TRUNC != 0;
        // One trip into the runtime: the content, then the stripe. Under the
        // stripe, the version read here is the one reintegration and stores
        // leave behind (they rebase open files under it too).
        let (node, _g) = self.rt.block_on(async {
            let node = self.ensure_content(fid, truncate).await?;
            Ok::<_, VenusError>((node, self.stripe(fid).lock().await))
        })?;
        if node.attr.kind != FileKind::File {
            return Err(FsError::IsDir.into());
        }
        if self.resolve(fid) != fid {
            return Ok(None);
        }
        self.cache.touch(fid);
        let node = self.cache.get(fid).unwrap_or(node);
        let shared = {
            let mut opened = self.opened.lock().unwrap();
            let shared = match opened.get_mut(&fid) {
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
                    let s = Arc::new(Shared::new(fid, file, node.attr.version.clone(), synced));
                    opened.insert(fid, (1, s.clone()));
                    s
                }
            };
            // Under the same lock as the count of opens, so no getattr sees
            // the file open but not yet written.
            if write {
                shared.writers.fetch_add(1, Ordering::Relaxed);
            }
            shared
        };
        if truncate {
            let emptied =
                shared.file.metadata().and_then(|m| if m.len() > 0 { shared.file.set_len(0) } else { Ok(()) });
            if let Err(e) = emptied {
                // The open fails, so no release will come for it.
                shared.writers.fetch_sub(1, Ordering::Relaxed);
                self.unopen(fid);
                return Err(e.into());
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, OpenFile { shared: shared.clone(), write });
        Ok(Some((fh, shared)))
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
    /// with the server. Returns once the server has it (AFS close semantics),
    /// or once the change is in the log when disconnected.
    pub fn flush(&self, fh: u64) -> Result<()> {
        let (shared, write) = match self.handles.lock().unwrap().get(&fh) {
            Some(h) => (h.shared.clone(), h.write),
            None => return Ok(()),
        };
        if !write && !self.is_deferred(self.resolve(shared.fid())) {
            return Ok(());
        }
        self.rt.block_on(self.store_shared(&shared))
    }

    pub(crate) async fn store_shared(&self, shared: &Shared) -> Result<()> {
        let _one_close_at_a_time = shared.storing.lock().await;
        loop {
            let fid = self.resolve(shared.fid());
            if let Some(conflict) = self.refused_conflict(fid) {
                return self.keep_refused(conflict, shared);
            }
            let _g = self.stripe(fid).lock().await;
            // Decided under the lock: reintegration may have renumbered
            // the file while this waited.
            if self.resolve(shared.fid()) != fid {
                continue;
            }
            if self.is_deferred(fid) {
                // Created on the server first, with its content; the store
                // that follows is skipped if that content is still current.
                self.create_deferred(fid).await?;
                continue;
            }
            return self.store_locked(fid, shared).await;
        }
    }

    /// `store_shared` with the object's stripe lock held.
    async fn store_locked(&self, fid: Fid, shared: &Shared) -> Result<()> {
        if self.cache.view(fid, |n| n.attr.nlink == 0).unwrap_or(false) {
            // Its last name was removed while it was open: nobody can reach
            // this content again, and a store would only fail (or, logged,
            // come back as a spurious update/remove conflict).
            return Ok(());
        }
        let meta = shared.file.metadata()?;
        let now = ContainerStamp::of(&meta);
        let dirty = self.cache.view(fid, |n| n.dirty).unwrap_or(false);
        if shared.synced.lock().unwrap().same_content(&now)
            && !(dirty && self.link.is_connected() && self.cml.is_empty())
        {
            return Ok(());
        }
        tracing::debug!(%fid, synced = ?*shared.synced.lock().unwrap(), ?now, dirty, "storing");
        let base = shared.base.lock().unwrap().clone();
        self.cache.update(fid, |n| n.dirty = true);
        if fid.is_local() || !self.link.is_connected() || !self.cml.is_empty() {
            // Offline (or the log still holds older changes, which must go
            // first): the change goes to the log.
            return self.log_store(fid, shared, now, base, None);
        }
        self.counters.stores.fetch_add(1, Ordering::Relaxed);
        // A store cut short by a crash of venus is resent under the same
        // transaction id (the node remembers it), so it runs at most once
        // instead of coming back as a conflict with itself.
        let (mut seq, mut resent) = match self.cache.view(fid, |n| n.store_seq).flatten() {
            Some(s) => (s, true),
            None => {
                let s = self.client.allocate_sequence();
                self.cache.update(fid, |n| n.store_seq = Some(s));
                (s, false)
            }
        };
        let mtime = Some(now.mtime);
        let result = loop {
            let r = common::rpc::store_with_seq(&self.client, seq, fid, base.clone(), shared.file.clone(), mtime, None)
                .await;
            match &r {
                Err(RpcError::Fs(e)) if resent && common::rpc::is_acknowledged_already(e) => {
                    // That store ran, and this client acknowledged its
                    // reply before the crash, but the node's record of it
                    // (written without a flush) was lost. Sent again under a
                    // new id, it shows whether the server holds this content
                    // (a conflict with our own store, `own_store_ran`) or not.
                    self.client.unhold(seq);
                    seq = self.client.allocate_sequence();
                    self.cache.update(fid, |n| n.store_seq = Some(seq));
                    resent = false;
                }
                _ => break r,
            }
        };
        if !matches!(&result, Err(e) if e.is_transport()) {
            self.client.unhold(seq);
        }
        // From here the log (transport failure) or nobody owns the id.
        self.cache.update(fid, |n| n.store_seq = None);
        match result {
            Ok(reply) => {
                let after = ContainerStamp::of(&shared.file.metadata()?);
                *shared.base.lock().unwrap() = reply.attr.version.clone();
                // A resent store may be answered with the reply to an earlier
                // attempt of other content: then this content is still ours to store.
                let answered_other = resent && (reply.attr.size != now.size || reply.attr.mtime != now.mtime);
                let written_since = !after.same_content(&now) || answered_other;
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
                // The server may or may not have it: the log resends it under
                // the same transaction id, so it runs at most once.
                self.link.lost(format!("a store failed: {e}"));
                self.log_store(fid, shared, now, base, Some(seq))
            }
            Err(RpcError::Fs(FsError::Conflict(server))) if self.own_store_ran(&base, &server, now) => {
                // An earlier attempt of this very store ran and its reply was
                // lost with a crash. Not a conflict with ourselves.
                *shared.base.lock().unwrap() = server.version.clone();
                *shared.synced.lock().unwrap() = now;
                self.cache.update(fid, |n| {
                    n.attr = *server;
                    n.cached = true;
                    n.dirty = false;
                    n.clean = Some(now);
                });
                Ok(())
            }
            Err(RpcError::Fs(FsError::Conflict(server))) => {
                let path = self.cache.path_of(fid);
                self.conflict_from_store(
                    fid,
                    &path,
                    shared.file.as_ref(),
                    Some(*server),
                    "the file changed on the server",
                )?;
                Err(errno(libc::EIO, "store conflict: both versions kept (see venus conflicts list)"))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the server's version is what this client's store of `now`
    /// on `base` made: exactly one step of ours past the base, with the
    /// size and mtime (a store carries the container's) of this content.
    /// Size and mtime alone could match another client's write.
    pub(crate) fn own_store_ran(&self, base: &VersionVector, server: &Attr, now: ContainerStamp) -> bool {
        let mut ours = base.clone();
        ours.increment(self.client.id());
        server.version == ours && server.size == now.size && server.mtime == now.mtime
    }

    /// Puts a store in the log; the container (fsynced) holds its content.
    fn log_store(
        &self,
        fid: Fid,
        shared: &Shared,
        now: ContainerStamp,
        base: VersionVector,
        seq: Option<u64>,
    ) -> Result<()> {
        shared.file.sync_all()?;
        self.failpoint("before-log-store");
        self.log_append(CmlOp::Store { fid, base, mode: None }, seq)?;
        // Renumbered since the caller looked, perhaps (as the log knows).
        let fid = self.resolve(fid);
        *shared.synced.lock().unwrap() = now;
        self.cache.update(fid, |n| {
            n.dirty = true;
            n.attr.size = now.size;
            n.attr.mtime = now.mtime;
        });
        self.cache.set_size(fid, now.size);
        self.cache.flush()?;
        Ok(())
    }

    pub fn fsync(&self, fh: u64) -> Result<()> {
        let shared = self.handle(fh)?;
        shared.file.sync_all()?;
        self.rt.block_on(self.store_shared(&shared))
    }

    pub fn release(&self, fh: u64) -> Result<()> {
        let Some(h) = self.handles.lock().unwrap().remove(&fh) else { return Ok(()) };
        let store = h.write || self.is_deferred(self.resolve(h.shared.fid()));
        let result = if store { self.rt.block_on(self.store_shared(&h.shared)) } else { Ok(()) };
        if h.write {
            // After the store: until it has updated the node, the container
            // is the truth.
            h.shared.writers.fetch_sub(1, Ordering::Relaxed);
        }
        // Read after the store, which may have given the file its server fid.
        let fid = h.shared.fid();
        self.unopen(fid);
        if !self.is_open(fid) {
            self.refused.lock().unwrap().remove(&fid);
        }
        let fid = self.resolve(fid);
        if !self.cache.contains(fid) {
            // Removed while open: the container goes now.
            let _ = std::fs::remove_file(self.cache.container_path(fid));
            self.cache.drop_size(fid);
        }
        result
    }

    /// Counts one open of `fid` as ended (under the fid it was opened with,
    /// or the server's, if reintegration has since renamed it); the last
    /// one lets go of the shared container.
    fn unopen(&self, fid: Fid) {
        let mut opened = self.opened.lock().unwrap();
        for key in [fid, self.resolve(fid)] {
            if let Some((count, _)) = opened.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    opened.remove(&key);
                }
                break;
            }
        }
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

    pub(crate) fn after_dir_change(
        &self,
        dir: Fid,
        dir_attr: Option<Attr>,
        add: Option<(&str, Fid, FileKind)>,
        remove: Option<&str>,
    ) {
        let keep_valid =
            self.cache.view(dir, |n| n.current() || !self.link.is_connected() || dir.is_local()).unwrap_or(false);
        self.cache.update(dir, |n| {
            if let Some(entries) = n.entries.as_mut() {
                if let Some(name) = remove {
                    entries.remove(name);
                }
                if let Some((name, fid, kind)) = add {
                    entries.insert(name.to_string(), (fid, kind));
                }
            }
            if let Some(a) = dir_attr {
                n.attr = a;
            }
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
        self.after_dir_change(dir, Some(e.dir.clone()), Some((name, e.attr.fid, e.attr.kind)), None);
    }

    /// Runs a mutation on the server under a fresh transaction id; on a
    /// transport failure returns that id so the offline path can log the
    /// change under it (the server may already have run it).
    pub(crate) fn mutate<'a, T>(
        &'a self,
        f: impl FnOnce(u64) -> CallFuture<'a>,
        unwrap: impl FnOnce(Reply) -> Option<T>,
    ) -> std::result::Result<T, Mutation> {
        if !self.link.is_connected() || !self.cml.is_empty() {
            return Err(Mutation::Offline(None));
        }
        let seq = self.client.allocate_sequence();
        let result = self.rt.block_on(f(seq));
        match result {
            Err(e) if e.is_transport() => {
                // Stays held: the log resends it under this id.
                self.link.lost(format!("a request failed: {e}"));
                Err(Mutation::Offline(Some(seq)))
            }
            other => {
                self.client.unhold(seq);
                match other {
                    Ok(r) => unwrap(r).ok_or(Mutation::Failed(errno(libc::EIO, "reply of the wrong kind"))),
                    Err(e) => Err(Mutation::Failed(e.into())),
                }
            }
        }
    }

    /// Runs the offline version of a mutation. If it fails, the transaction
    /// id of a failed connected attempt is released: nothing will resend it.
    fn logged<T>(&self, seq: Option<u64>, offline: impl FnOnce(Option<u64>) -> Result<T>) -> Result<T> {
        let result = offline(seq);
        if let (Err(_), Some(s)) = (&result, seq) {
            self.client.unhold(s);
        }
        result
    }

    fn call(&self, seq: u64, req: Request) -> CallFuture<'_> {
        Box::pin(self.client.call_with_seq(seq, req))
    }

    /// Creates and opens a file.
    pub fn create(&self, dir: Fid, name: &std::ffi::OsStr, mode: u32, flags: i32) -> Result<(Attr, u64, Arc<Shared>)> {
        let dir = self.resolve(dir);
        let name = name_str(name)?;
        common::error::validate_name(name)?;
        let exclusive = flags & libc::O_EXCL != 0;
        // A deferred file is held as being opened from the moment it
        // exists, so the sweep of orphaned ones passes it by.
        let (fid, _opening) = match self.defer_create(dir, name, mode & 0o7777, exclusive)? {
            Some((local, opening)) => {
                self.failpoint("deferred-before-open");
                (local, Some(opening))
            }
            None => (self.create_now(dir, name, mode & 0o7777, exclusive)?, None),
        };
        let (fh, shared) = self.open(fid, flags & !libc::O_CREAT & !libc::O_EXCL)?;
        // Renumbered meanwhile, perhaps: the alias comes first, then the
        // node moves, then the open's fid.
        let fid = shared.fid();
        let (attr, _) = self
            .cached_attr(self.resolve(fid), true)
            .or_else(|| self.cached_attr(fid, true))
            .ok_or_else(|| errno(libc::EIO, "node vanished after a create"))?;
        Ok((attr, fh, shared))
    }

    /// Creates a file on the server (or in the log) at once.
    fn create_now(&self, dir: Fid, name: &str, mode: u32, exclusive: bool) -> Result<Fid> {
        let req = CreateReq { dir, name: name.to_string(), mode, exclusive, content: None };
        match self.mutate(
            |seq| self.call(seq, Request::Create(req.clone())),
            |r| match r {
                Reply::Create(e) => Some(e),
                _ => None,
            },
        ) {
            Ok(e) => {
                let fid = e.attr.fid;
                self.learn_new(dir, name, &e);
                if e.attr.size == 0 && !self.cache.view(fid, |n| n.cached || n.dirty).unwrap_or(false) {
                    // A new, empty file: its content is known without a fetch.
                    let f = File::create(self.cache.container_path(fid))?;
                    let meta = f.metadata()?;
                    self.cache.update(fid, |n| {
                        n.cached = true;
                        n.clean = Some(ContainerStamp::of(&meta));
                    });
                    self.cache.set_size(fid, 0);
                }
                Ok(fid)
            }
            Err(Mutation::Offline(seq)) => self.logged(seq, |seq| self.offline_create(dir, name, mode, exclusive, seq)),
            Err(Mutation::Failed(e)) => Err(e),
        }
    }

    pub fn mkdir(&self, dir: Fid, name: &std::ffi::OsStr, mode: u32) -> Result<Attr> {
        let dir = self.resolve(dir);
        let name = name_str(name)?;
        common::error::validate_name(name)?;
        let req = MkdirReq { dir, name: name.to_string(), mode: mode & 0o7777 };
        match self.mutate(
            |seq| self.call(seq, Request::Mkdir(req.clone())),
            |r| match r {
                Reply::Mkdir(e) => Some(e),
                _ => None,
            },
        ) {
            Ok(e) => {
                self.learn_new(dir, name, &e);
                self.cache.update(e.attr.fid, |n| n.entries = Some(BTreeMap::new()));
                Ok(e.attr)
            }
            Err(Mutation::Offline(seq)) => self.logged(seq, |seq| self.offline_mkdir(dir, name, mode & 0o7777, seq)),
            Err(Mutation::Failed(e)) => Err(e),
        }
    }

    pub fn symlink(&self, dir: Fid, name: &std::ffi::OsStr, target: &std::path::Path) -> Result<Attr> {
        let dir = self.resolve(dir);
        let name = name_str(name)?;
        common::error::validate_name(name)?;
        let target = target.to_str().ok_or_else(|| errno(libc::EINVAL, "targets must be UTF-8"))?.to_string();
        let req = SymlinkReq { dir, name: name.to_string(), target: target.clone() };
        match self.mutate(
            |seq| self.call(seq, Request::Symlink(req.clone())),
            |r| match r {
                Reply::Symlink(e) => Some(e),
                _ => None,
            },
        ) {
            Ok(e) => {
                self.learn_new(dir, name, &e);
                self.cache.update(e.attr.fid, |n| n.target = Some(target));
                Ok(e.attr)
            }
            Err(Mutation::Offline(seq)) => self.logged(seq, |seq| self.offline_symlink(dir, name, &target, seq)),
            Err(Mutation::Failed(e)) => Err(e),
        }
    }

    pub fn link(&self, fid: Fid, dir: Fid, name: &std::ffi::OsStr) -> Result<Attr> {
        self.settle_deferred(fid)?;
        let (fid, dir) = (self.resolve(fid), self.resolve(dir));
        let name = name_str(name)?;
        common::error::validate_name(name)?;
        let req = LinkReq { fid, dir, name: name.to_string() };
        match self.mutate(
            |seq| self.call(seq, Request::Link(req.clone())),
            |r| match r {
                Reply::Link(e) => Some(e),
                _ => None,
            },
        ) {
            Ok(e) => {
                self.learn_new(dir, name, &e);
                Ok(e.attr)
            }
            Err(Mutation::Offline(seq)) => self.logged(seq, |seq| self.offline_link(fid, dir, name, seq)),
            Err(Mutation::Failed(e)) => Err(e),
        }
    }

    pub fn unlink(&self, dir: Fid, name: &std::ffi::OsStr, is_dir: bool) -> Result<()> {
        let dir = self.resolve(dir);
        let name = name_str(name)?;
        self.settle_deferred_name(dir, name)?;
        let victim = self.listing(dir).ok().and_then(|e| e.get(name).map(|(f, _)| self.resolve(*f)));
        if let (true, Some(v)) = (is_dir, victim) {
            // The server decides whether it is empty: it must know its files.
            self.settle_deferred_in(v)?;
        }
        let req = if is_dir {
            Request::Rmdir(RmdirReq { dir, name: name.to_string() })
        } else {
            Request::Remove(RemoveReq { dir, name: name.to_string(), base: None })
        };
        match self.mutate(
            |seq| self.call(seq, req.clone()),
            |r| match r {
                Reply::Remove(d) | Reply::Rmdir(d) => Some(d),
                _ => None,
            },
        ) {
            Ok(r) => {
                self.after_dir_change(dir, Some(r.dir), None, Some(name));
                if let Some(fid) = victim {
                    self.forget_object(fid)?;
                }
                Ok(())
            }
            Err(Mutation::Offline(seq)) => self.logged(seq, |seq| self.offline_unlink(dir, name, is_dir, seq)),
            Err(Mutation::Failed(e)) => Err(e),
        }
    }

    /// An object lost a name: other names may remain (hard links), so its
    /// attributes are stale; if nothing holds it open, its cache goes.
    /// A name of `fid` is gone. With its last name the object goes from the
    /// cache (its container once no handle is open) and so do its unsent
    /// logged changes: nobody can reach that content any more.
    pub(crate) fn forget_object(&self, fid: Fid) -> Result<()> {
        // A directory's link count counts its subdirectories, not names.
        let (nlink, is_dir) =
            self.cache.view(fid, |n| (n.attr.nlink, n.attr.kind == FileKind::Dir)).unwrap_or((1, false));
        let last_name = nlink <= 1 || is_dir;
        if last_name && !fid.is_local() {
            self.cml.drop_unsent_changes(fid)?;
        }
        if !last_name || self.is_open(fid) {
            self.cache.update(fid, |n| {
                n.valid = false;
                n.attr.nlink = n.attr.nlink.saturating_sub(1);
            });
        } else {
            self.cache.remove(fid);
        }
        Ok(())
    }

    pub fn rename(
        &self,
        dir: Fid,
        name: &std::ffi::OsStr,
        to_dir: Fid,
        to_name: &std::ffi::OsStr,
        flags: u32,
    ) -> Result<()> {
        let (dir, to_dir) = (self.resolve(dir), self.resolve(to_dir));
        let (name, to_name) = (name_str(name)?, name_str(to_name)?);
        common::error::validate_name(to_name)?;
        self.settle_deferred_name(dir, name)?;
        self.settle_deferred_name(to_dir, to_name)?;
        if flags & libc::RENAME_EXCHANGE != 0 {
            return Err(errno(libc::EINVAL, "RENAME_EXCHANGE is not supported"));
        }
        let no_replace = flags & libc::RENAME_NOREPLACE != 0;
        let replaced = self.listing(to_dir).ok().and_then(|e| e.get(to_name).map(|(f, _)| self.resolve(*f)));
        if let Some(r) = replaced {
            // A directory replaced must be empty on the server too.
            self.settle_deferred_in(r)?;
        }
        let req = RenameReq {
            from_dir: dir,
            from_name: name.to_string(),
            to_dir,
            to_name: to_name.to_string(),
            no_replace,
            replaced_base: None,
        };
        match self.mutate(
            |seq| self.call(seq, Request::Rename(req.clone())),
            |r| match r {
                Reply::Rename(r) => Some(r),
                _ => None,
            },
        ) {
            Ok(r) => {
                let moved = r.moved.fid;
                if let Some(t) = replaced.filter(|t| *t != moved) {
                    self.forget_object(t)?;
                }
                self.after_dir_change(dir, Some(r.from_dir), None, Some(name));
                self.after_dir_change(to_dir, Some(r.to_dir), Some((to_name, moved, r.moved.kind)), None);
                let keep = self.cache.view(moved, |n| n.current()).unwrap_or(false);
                self.cache.learn(moved, r.moved, Some((to_dir, to_name.to_string())), None);
                if !keep {
                    self.cache.update(moved, |n| n.valid = false);
                }
                Ok(())
            }
            Err(Mutation::Offline(seq)) => {
                self.logged(seq, |seq| self.offline_rename(dir, name, to_dir, to_name, no_replace, seq))
            }
            Err(Mutation::Failed(e)) => Err(e),
        }
    }

    pub fn setattr(&self, fid: Fid, set: SetAttr, fh: Option<u64>) -> Result<(Attr, Duration)> {
        self.settle_deferred(fid)?;
        let fid = self.resolve(fid);
        let open = fh
            .and_then(|fh| self.handle(fh).ok())
            .or_else(|| self.opened.lock().unwrap().get(&fid).map(|(_, s)| s.clone()));
        // Writes not yet stored must survive the setattr: the container then
        // stays out of step with the server, and the close stores it.
        let unsynced = self.cache.view(fid, |n| n.dirty).unwrap_or(false)
            || open.as_ref().is_some_and(|s| {
                s.file
                    .metadata()
                    .map(|m| !ContainerStamp::of(&m).same_content(&s.synced.lock().unwrap()))
                    .unwrap_or(true)
            });
        let req = SetAttrReq { fid, set: set.clone(), base: None };
        let reply = {
            let _g = self.rt.block_on(self.stripe(fid).lock());
            self.mutate(
                |seq| self.call(seq, Request::SetAttr(req.clone())),
                |r| match r {
                    Reply::SetAttr(e) => Some(e),
                    _ => None,
                },
            )
        };
        let reply = match reply {
            Ok(r) => Some(r),
            Err(Mutation::Offline(seq)) => {
                self.logged(seq, |seq| self.offline_setattr(fid, &set, seq))?;
                None
            }
            Err(Mutation::Failed(e)) => return Err(e),
        };
        // Apply the same change to the local copy, so a later store agrees.
        let container = match &open {
            Some(s) => Some(s.file.clone()),
            None if self.cache.view(fid, |n| n.cached || n.dirty).unwrap_or(false) => {
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
            if let (Some(s), Some(r)) = (&open, &reply) {
                *s.base.lock().unwrap() = r.attr.version.clone();
            }
            if let Some(s) = &open {
                let mut synced = s.synced.lock().unwrap();
                if !unsynced && *synced != ContainerStamp::default() {
                    *synced = stamp;
                }
            }
            if let Some(r) = &reply {
                self.cache.learn(fid, r.attr.clone(), None, promise_exp(r.promise));
            }
            let version = reply.as_ref().map(|r| r.attr.version.clone());
            self.cache.update(fid, |n| {
                n.cached = true;
                if unsynced {
                    // Still ours to store, now on top of the setattr's version.
                    n.dirty = true;
                    n.clean = None;
                    if let Some(v) = version {
                        n.attr.version = v;
                    }
                } else if reply.is_some() {
                    n.clean = Some(stamp);
                }
            });
            self.cache.set_size(fid, stamp.size);
        } else if let Some(r) = &reply {
            self.cache.learn(fid, r.attr.clone(), None, promise_exp(r.promise));
        }
        self.cached_attr(fid, true).ok_or_else(|| errno(libc::EIO, "node vanished after a setattr"))
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
                    // Stale, not forgotten: connected, the listing is fetched
                    // again before use; offline, a stale listing is better
                    // than none (and holds offline edits until reintegrated).
                    n.valid = false;
                    n.entries.as_ref().map(|e| e.keys().cloned().collect()).unwrap_or_default()
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
        let mut items: Vec<(Fid, VersionVector)> = Vec::new();
        self.cache.visit(|f, n| {
            if !n.dirty && !f.is_local() {
                items.push((f, n.attr.version.clone()));
            }
        });
        let mut current = 0;
        let mut stale = Vec::new();
        for chunk in items.chunks(50_000) {
            let r = self.remote(self.client.validate(ValidateReq { items: chunk.to_vec() })).await?;
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
        // Kernel invalidations may block: not on a runtime thread.
        tokio::task::block_in_place(|| self.on_break(&stale));
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
            if self.drop_container(fid) {
                tracing::debug!(%fid, size, "evicted");
            }
        }
    }

    /// Deletes a closed container. The check and the unlink happen under
    /// the `opened` lock, which `open` holds while opening a container, so
    /// no open can slip in between; `open` copes with a container that
    /// vanished just before.
    fn drop_container(&self, fid: Fid) -> bool {
        // (Lock order: the node table before `opened`, never the reverse.)
        if self.cache.view(fid, |n| n.dirty).unwrap_or(false) {
            return false;
        }
        {
            let opened = self.opened.lock().unwrap();
            if opened.contains_key(&fid) {
                return false;
            }
            let _ = std::fs::remove_file(self.cache.container_path(fid));
        }
        self.cache.drop_size(fid);
        self.cache.update(fid, |n| {
            n.cached = false;
            n.clean = None;
        });
        true
    }

    /// Drops cached content of clean, closed files (all, or under `under`).
    pub fn flush_cache(&self, under: Option<Fid>) -> (usize, u64) {
        let under = under.map(|f| self.resolve(f));
        let (mut n, mut bytes) = (0, 0);
        for (fid, size) in self.cache.eviction_order(&|f| self.is_open(f)) {
            if let Some(top) = under {
                if !self.cache.is_within(fid, top) {
                    continue;
                }
            }
            if self.drop_container(fid) {
                n += 1;
                bytes += size;
            }
        }
        (n, bytes)
    }

    /// Stores every dirty file that is not open and not in the log (stores
    /// deferred by a crash of venus); logged ones go with reintegration.
    pub async fn store_dirty(&self) -> usize {
        let mut stored = 0;
        for fid in self.cache.fids_where(|n| n.dirty && n.attr.kind == FileKind::File) {
            let _g = self.stripe(fid).lock().await;
            // Decided under the lock: a close-time store or reintegration
            // may have stored it (and moved its version on) meanwhile.
            let Some(n) = self.cache.get(fid) else { continue };
            if !n.dirty
                || n.attr.kind != FileKind::File
                || self.is_open_or_opening(fid)
                || fid.is_local()
                || self.cml.any(|r| r.op.subject() == fid)
            {
                continue;
            }
            let file = match std::fs::OpenOptions::new().read(true).write(true).open(self.cache.container_path(fid)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(%fid, "dirty file has no container: {e}");
                    continue;
                }
            };
            let shared = Shared::new(fid, file, n.attr.version.clone(), ContainerStamp::default());
            match self.store_locked(fid, &shared).await {
                Ok(()) if !self.cache.view(fid, |n| n.dirty).unwrap_or(false) => stored += 1,
                Ok(()) => {}
                Err(e) => tracing::warn!(%fid, "storing a file left dirty failed: {e}"),
            }
        }
        stored
    }

    pub fn open_handles(&self) -> usize {
        self.handles.lock().unwrap().len()
    }

    /// Every open handle's shared state (for renumbering local fids).
    pub(crate) fn open_shared(&self) -> Vec<Arc<Shared>> {
        self.opened.lock().unwrap().values().map(|(_, s)| s.clone()).collect()
    }

    pub(crate) fn invalidate_kernel_entry(&self, dir: Fid, name: &str) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_entry(fuser::INodeNo(dir.0), std::ffi::OsStr::new(name));
        }
    }
}

/// A request to the server in flight.
pub(crate) type CallFuture<'a> =
    std::pin::Pin<Box<dyn Future<Output = std::result::Result<Reply, RpcError>> + Send + 'a>>;

/// Why a mutation did not complete on the server.
pub(crate) enum Mutation {
    /// Offline (or went offline): do it locally and log it, under this
    /// transaction id if one was already tried.
    Offline(Option<u64>),
    Failed(VenusError),
}

impl From<VenusError> for fuser::Errno {
    /// An EIO tells the user nothing but that something broke, so its
    /// cause goes to the log.
    fn from(e: VenusError) -> Self {
        let errno = crate::errors::ToErrno::errno(&e);
        if errno == fuser::Errno::EIO {
            tracing::warn!("answering EIO: {e}");
        }
        errno
    }
}

/// An open under way: from before it looks at the node until `opened`
/// has the file (or the open failed). The 2-second sweeps
/// (`create_orphaned_deferred`, `store_dirty`) act only on files nobody
/// holds; without this, a new file whose server create waits for its
/// close, or a file just truncated, looked like one in the moment before
/// its open registered.
pub(crate) struct Opening<'a> {
    venus: &'a Venus,
    fid: Fid,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut opening = self.venus.opening.lock().unwrap();
        if let Some(n) = opening.get_mut(&self.fid) {
            *n -= 1;
            if *n == 0 {
                opening.remove(&self.fid);
            }
        }
    }
}
