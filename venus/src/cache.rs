//! The cache: what venus knows of each object, persisted in sled, and the
//! container files that hold cached file contents.
//!
//! Every change to a node is written through to sled, so a venus restart
//! starts from the same picture. Container files live in
//! `CACHE/containers/XX/FID` and are replaced by rename (fetch into a
//! temporary, then rename), so a crash never leaves a half-fetched file
//! looking complete.
//!
//! Why 256 shard directories: ext4 allocates a file's inode in its
//! directory's block group, and without a journal it skips every inode
//! freed in the last few minutes, one inode-table read each. With all
//! containers in one directory, every `rm -rf` on the mount made the next
//! few thousand container creates scan the whole freed set (~1 ms each,
//! measured). The shards' parent is marked as a top of hierarchy
//! ([`common::mark_top_dir`]), so the allocator spreads the shards over
//! many groups.

use crate::errors::Result;
use common::{Attr, Fid, FileKind, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Directory nodes with more entries than this are written to sled in
/// batches ([`Cache::write_deferred`]), not on every change: re-encoding a
/// listing of N names for each create made filling a directory O(N²)
/// (10,000 creates wrote ~1.5 GB to the index). A batch is written at
/// least every [`DEFERRED_EVERY`], and by every [`Cache::flush`], so what
/// a flush promises is unchanged; sled's own unflushed window is 500 ms.
const DEFER_ENTRIES: usize = 64;
pub const DEFERRED_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Container shard directories (`containers/00` .. `containers/ff`).
const SHARDS: u64 = 256;

/// The container's state when venus last knew it matched the server: a
/// different state at startup means it was written while venus was down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStamp {
    pub ino: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl ContainerStamp {
    pub fn of(meta: &std::fs::Metadata) -> ContainerStamp {
        ContainerStamp {
            ino: meta.ino(),
            size: meta.len(),
            mtime: Timestamp { secs: meta.mtime(), nanos: meta.mtime_nsec() as u32 },
            ctime: Timestamp { secs: meta.ctime(), nanos: meta.ctime_nsec() as u32 },
        }
    }

    /// Whether both show the same content: ctime aside, which venus moves
    /// itself when it drops a container's old name after a renumbering
    /// (see `Cache::restamp`). Across a restart the whole stamp counts.
    pub fn same_content(&self, other: &ContainerStamp) -> bool {
        (self.ino, self.size, self.mtime) == (other.ino, other.size, other.mtime)
    }
}

/// What venus knows of one object.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    /// The server's attributes; `attr.version` is the version the cached
    /// content is based on.
    pub attr: Attr,
    /// One name of the object, to show paths (`cache ls`) and to flush trees.
    pub parent: Option<(Fid, String)>,
    /// A callback promise is held: attributes, content and listing are current.
    pub valid: bool,
    /// When the promise runs out (seconds since the epoch).
    pub expires: i64,
    /// The container file holds this object's content.
    pub cached: bool,
    /// The container holds changes the server does not have yet.
    pub dirty: bool,
    /// The container as it was when last in step with the server.
    pub clean: Option<ContainerStamp>,
    /// A directory's entries, when fetched.
    pub entries: Option<BTreeMap<String, (Fid, FileKind)>>,
    /// A symlink's target, when fetched.
    pub target: Option<String>,
    /// Recency for eviction (a global counter, larger is newer).
    pub last_used: u64,
    /// Hoard priority (0: not hoarded); evicted last, lowest first.
    #[serde(default)]
    pub hoard: u32,
    /// The transaction id of a store in flight (kept across a crash).
    #[serde(default)]
    pub store_seq: Option<u64>,
    /// Made locally; its server create waits for its first close
    /// (`deferred.rs`). A crash of venus leaves it set: the restart logs the create.
    #[serde(default)]
    pub awaiting_create: bool,
}

impl Node {
    pub fn new(attr: Attr, parent: Option<(Fid, String)>) -> Node {
        Node {
            attr,
            parent,
            valid: false,
            expires: 0,
            cached: false,
            dirty: false,
            clean: None,
            entries: None,
            target: None,
            last_used: 0,
            hoard: 0,
            store_seq: None,
            awaiting_create: false,
        }
    }

    /// Valid and not expired: may be used without asking the server.
    pub fn current(&self) -> bool {
        self.valid && self.expires > now_secs()
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// A big-endian u64 key or value.
pub fn be(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap_or([0; 8]))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("cache records always encode")
}

/// The index and the containers.
pub struct Cache {
    pub dir: PathBuf,
    db: sled::Db,
    nodes_tree: sled::Tree,
    meta: sled::Tree,
    nodes: Mutex<HashMap<Fid, Node>>,
    /// Bytes in each container, for the size limit.
    sizes: Mutex<HashMap<Fid, u64>>,
    clock: AtomicU64,
    pub limit: u64,
    /// Old container names of renumbered objects (see `link_container`).
    unlink_after_flush: Mutex<Vec<(PathBuf, Fid)>>,
    /// Large directory nodes changed in memory and not yet in sled.
    deferred: Mutex<HashSet<Fid>>,
    /// sled's log file: sled's flush ends with `sync_file_range` only, so
    /// `flush` adds an fdatasync of it (the size of the appended log and
    /// the disk's cache), or a power cut could lose a logged change.
    log: std::fs::File,
}

impl Cache {
    pub fn open(dir: &Path, limit: u64) -> Result<Cache> {
        make_container_dirs(&dir.join("containers"))?;
        let db = sled::Config::new().path(dir.join("index")).open()?;
        let log = std::fs::File::open(dir.join("index").join("db"))?;
        let nodes_tree = db.open_tree("nodes")?;
        let meta = db.open_tree("meta")?;
        let mut nodes = HashMap::new();
        let mut clock = 0;
        for item in nodes_tree.iter() {
            let (k, v) = item?;
            let fid = Fid(u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])));
            match rmp_serde::from_slice::<Node>(&v) {
                Ok(n) => {
                    clock = clock.max(n.last_used);
                    nodes.insert(fid, n);
                }
                Err(e) => tracing::warn!(%fid, "dropping an unreadable cache record: {e}"),
            }
        }
        let cache = Cache {
            dir: dir.to_path_buf(),
            db,
            nodes_tree,
            meta,
            nodes: Mutex::new(nodes),
            sizes: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(clock + 1),
            limit,
            unlink_after_flush: Mutex::new(Vec::new()),
            deferred: Mutex::new(HashSet::new()),
            log,
        };
        Ok(cache)
    }

    /// Reconciles containers on disk with the index: leftovers of
    /// interrupted fetches go, containers written while venus was down
    /// become dirty. `keep` names objects the log still needs: their
    /// containers are never deleted, indexed or not.
    pub fn scan_containers(&self, keep: &HashSet<Fid>) -> Result<()> {
        let mut sizes = self.sizes.lock().unwrap();
        let mut nodes = self.nodes.lock().unwrap();
        for (path, meta) in container_entries(&self.dir.join("containers"))? {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let Some(fid) = name.parse::<u64>().ok().map(Fid) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let moved = path != self.container_path(fid);
            if moved {
                // Not in its shard: a cache from before the shards, or a
                // stray. Its shard is where every other path looks.
                std::fs::rename(&path, self.container_path(fid))?;
            }
            match nodes.get_mut(&fid) {
                Some(n) if n.cached => {
                    if !n.dirty && n.clean != Some(ContainerStamp::of(&meta)) {
                        tracing::info!(%fid, "container changed while venus was down: will store it");
                        n.dirty = true;
                        self.nodes_tree.insert(fid.0.to_be_bytes(), encode(&*n))?;
                    } else if moved && !n.dirty {
                        // The rename changed its ctime, not its content.
                        n.clean = Some(ContainerStamp::of(&std::fs::metadata(self.container_path(fid))?));
                        self.nodes_tree.insert(fid.0.to_be_bytes(), encode(&*n))?;
                    }
                    sizes.insert(fid, meta.len());
                }
                _ if keep.contains(&fid) => {
                    tracing::warn!(%fid, "keeping a container the log needs although the index lost it");
                    sizes.insert(fid, meta.len());
                }
                _ => {
                    let _ = std::fs::remove_file(self.container_path(fid));
                }
            }
        }
        for (fid, n) in nodes.iter_mut() {
            if n.cached && !sizes.contains_key(fid) {
                n.cached = false;
                n.dirty = false;
            }
        }
        Ok(())
    }

    fn shard(&self, fid: Fid) -> PathBuf {
        self.dir.join("containers").join(format!("{:02x}", fid.0 % SHARDS))
    }

    pub fn container_path(&self, fid: Fid) -> PathBuf {
        self.shard(fid).join(fid.0.to_string())
    }

    /// Beside the container, so the rename that completes a fetch stays
    /// within one directory.
    pub fn temp_path(&self, fid: Fid) -> PathBuf {
        self.shard(fid).join(format!("{}.fetch-{}", fid.0, Uuid::new_v4().simple()))
    }

    pub fn get(&self, fid: Fid) -> Option<Node> {
        self.nodes.lock().unwrap().get(&fid).cloned()
    }

    /// Looks at a node without copying it (a directory's listing can be large).
    pub fn view<R>(&self, fid: Fid, f: impl FnOnce(&Node) -> R) -> Option<R> {
        self.nodes.lock().unwrap().get(&fid).map(f)
    }

    pub fn contains(&self, fid: Fid) -> bool {
        self.nodes.lock().unwrap().contains_key(&fid)
    }

    /// Writes a node to sled, or marks it for the next batch when it is a
    /// large directory. Called with the nodes lock held, so a batch never
    /// writes back a node removed meanwhile.
    fn persist(&self, fid: Fid, n: &Node) {
        if n.entries.as_ref().is_some_and(|e| e.len() > DEFER_ENTRIES) {
            self.deferred.lock().unwrap().insert(fid);
        } else {
            let _ = self.nodes_tree.insert(fid.0.to_be_bytes(), encode(n));
        }
    }

    /// Writes the deferred directory nodes, each as it is now.
    pub fn write_deferred(&self) {
        let fids = std::mem::take(&mut *self.deferred.lock().unwrap());
        if fids.is_empty() {
            return;
        }
        let nodes = self.nodes.lock().unwrap();
        for fid in fids {
            if let Some(n) = nodes.get(&fid) {
                let _ = self.nodes_tree.insert(fid.0.to_be_bytes(), encode(n));
            }
        }
    }

    /// Applies `f` to a node (creating none) and writes it through.
    pub fn update<R>(&self, fid: Fid, f: impl FnOnce(&mut Node) -> R) -> Option<R> {
        let mut nodes = self.nodes.lock().unwrap();
        let n = nodes.get_mut(&fid)?;
        let r = f(n);
        self.persist(fid, n);
        Some(r)
    }

    /// Adds or replaces a node.
    pub fn insert(&self, fid: Fid, node: Node) {
        let mut nodes = self.nodes.lock().unwrap();
        self.persist(fid, &node);
        nodes.insert(fid, node);
    }

    /// Moves a node to a new fid (a local fid got its server fid), with its
    /// container, and repoints children and listings at it.
    pub fn renumber(&self, from: Fid, to: Fid) {
        if from == to {
            return;
        }
        let mut nodes = self.nodes.lock().unwrap();
        let Some(mut node) = nodes.remove(&from) else { return };
        let _ = self.nodes_tree.remove(from.0.to_be_bytes());
        node.attr.fid = to;
        let mut sizes = self.sizes.lock().unwrap();
        let size = sizes.remove(&from);
        if self.link_container(from, to) {
            if let Some(size) = size {
                sizes.insert(to, size);
            }
        }
        drop(sizes);
        self.persist(to, &node);
        // Who refers to `from`: the directory its one name is in, and the
        // children its own listing names. Only an object with several names
        // (or one whose parent does not list it as expected) needs a look
        // at every cached directory: with tens of thousands of cached
        // entries that look, once per object a reintegration creates, was
        // most of the reintegration's time.
        let parent = node.parent.clone();
        let children: Vec<Fid> = node.entries.iter().flat_map(|e| e.values().map(|(f, _)| *f)).collect();
        let one_name = node.attr.kind == common::FileKind::Dir || node.attr.nlink <= 1;
        nodes.insert(to, node);
        let listed_by_parent = parent.as_ref().is_some_and(|(p, name)| {
            nodes.get(p).and_then(|d| d.entries.as_ref()).and_then(|e| e.get(name)).is_some_and(|(f, _)| *f == from)
        });
        if one_name && listed_by_parent {
            let (p, name) = parent.expect("listed by its parent");
            if let Some(dir) = nodes.get_mut(&p) {
                if let Some(entry) = dir.entries.as_mut().and_then(|e| e.get_mut(&name)) {
                    entry.0 = to;
                }
                self.persist(p, dir);
            }
            for child in children {
                if let Some(n) = nodes.get_mut(&child).filter(|n| n.parent.as_ref().is_some_and(|(p, _)| *p == from)) {
                    if let Some((p, _)) = n.parent.as_mut() {
                        *p = to;
                    }
                    self.persist(child, n);
                }
            }
            return;
        }
        for (fid, n) in nodes.iter_mut() {
            let mut changed = false;
            if let Some((p, _)) = n.parent.as_mut().filter(|(p, _)| *p == from) {
                *p = to;
                changed = true;
            }
            if let Some(entries) = n.entries.as_mut() {
                for (f, _) in entries.values_mut() {
                    if *f == from {
                        *f = to;
                        changed = true;
                    }
                }
            }
            if changed {
                self.persist(*fid, n);
            }
        }
    }

    /// Records fresh server attributes for `fid` (from a lookup, getattr,
    /// create...). If the version moved on, cached content and listing are
    /// stale; otherwise they stay.
    pub fn learn(&self, fid: Fid, attr: Attr, parent: Option<(Fid, String)>, promise: Option<i64>) {
        let mut nodes = self.nodes.lock().unwrap();
        let node = nodes.entry(fid).or_insert_with(|| Node::new(attr.clone(), parent.clone()));
        if node.attr.version != attr.version && !node.dirty {
            node.entries = None;
            node.target = None;
            // The content is of an older version: keep the file for open
            // handles, but it no longer counts as cached.
            node.cached = false;
        }
        if !node.dirty || node.attr.version == attr.version {
            node.attr = attr;
        }
        if parent.is_some() {
            node.parent = parent;
        }
        if let Some(exp) = promise {
            node.valid = true;
            node.expires = exp;
        }
        self.persist(fid, node);
    }

    pub fn remove(&self, fid: Fid) {
        self.nodes.lock().unwrap().remove(&fid);
        let _ = self.nodes_tree.remove(fid.0.to_be_bytes());
        if self.sizes.lock().unwrap().remove(&fid).is_some() {
            let _ = std::fs::remove_file(self.container_path(fid));
        }
    }

    pub fn touch(&self, fid: Fid) {
        let t = self.clock.fetch_add(1, Ordering::Relaxed);
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(n) = nodes.get_mut(&fid) {
            // In memory only: recency need not survive a crash exactly.
            n.last_used = t;
        }
    }

    /// Sets hoard priorities from a walk: listed nodes get theirs, all
    /// others none.
    pub fn set_hoard_priorities(&self, prio: &std::collections::HashMap<Fid, u32>) {
        let mut nodes = self.nodes.lock().unwrap();
        for (fid, n) in nodes.iter_mut() {
            let p = prio.get(fid).copied().unwrap_or(0);
            if n.hoard != p {
                n.hoard = p;
                self.persist(*fid, n);
            }
        }
    }

    /// Marks every node stale (after the server lost track of promises).
    pub fn invalidate_all(&self) -> Vec<Fid> {
        let mut nodes = self.nodes.lock().unwrap();
        let mut fids = Vec::with_capacity(nodes.len());
        for (fid, n) in nodes.iter_mut() {
            if n.valid {
                n.valid = false;
                self.persist(*fid, n);
            }
            fids.push(*fid);
        }
        fids
    }

    pub fn all(&self) -> Vec<(Fid, Node)> {
        self.nodes.lock().unwrap().iter().map(|(f, n)| (*f, n.clone())).collect()
    }

    /// The fids of the nodes `pick` selects, cloning no node: the periodic
    /// checks look over the whole cache every few seconds, and a cached
    /// directory's node holds its whole listing.
    pub fn fids_where(&self, pick: impl Fn(&Node) -> bool) -> Vec<Fid> {
        self.nodes.lock().unwrap().iter().filter(|(_, n)| pick(n)).map(|(f, _)| *f).collect()
    }

    /// How many nodes `pick` selects, cloning none.
    pub fn count_where(&self, pick: impl Fn(&Node) -> bool) -> usize {
        self.nodes.lock().unwrap().values().filter(|n| pick(n)).count()
    }

    /// Shows every node to `look`, cloning none (for tallies).
    pub fn visit(&self, mut look: impl FnMut(Fid, &Node)) {
        self.nodes.lock().unwrap().iter().for_each(|(f, n)| look(*f, n))
    }

    pub fn set_size(&self, fid: Fid, bytes: u64) {
        self.sizes.lock().unwrap().insert(fid, bytes);
    }

    pub fn drop_size(&self, fid: Fid) {
        self.sizes.lock().unwrap().remove(&fid);
    }

    pub fn bytes(&self) -> u64 {
        self.sizes.lock().unwrap().values().sum()
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The small-values tree, for owners that write it from elsewhere.
    pub fn meta_tree(&self) -> sled::Tree {
        self.meta.clone()
    }

    pub fn meta_get(&self, key: &str) -> Option<Vec<u8>> {
        self.meta.get(key).ok().flatten().map(|v| v.to_vec())
    }

    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<()> {
        self.meta.insert(key, value)?;
        Ok(())
    }

    /// Adds one to the counter `key` (atomically: creates run on several
    /// threads) and returns the value it had, starting from 1.
    pub fn meta_next(&self, key: &str) -> Result<u64> {
        let after = self.meta.update_and_fetch(key, |v| Some((v.map(be).unwrap_or(1) + 1).to_be_bytes().to_vec()))?;
        Ok(after.map(|v| be(&v)).unwrap_or(2) - 1)
    }

    /// Gives the container of `from` the name of `to` as well; the old name
    /// goes at the next flush. Until the index says the object is `to`
    /// (durably), a crash must find its content under `from`: renaming
    /// first would leave a container no record names, and the scan at start
    /// would delete it.
    fn link_container(&self, from: Fid, to: Fid) -> bool {
        let (old, new) = (self.container_path(from), self.container_path(to));
        let linked = match std::fs::hard_link(&old, &new) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let same = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
                // Linked before a crash: the same file. Anything else there is stale.
                same(&old) == same(&new) || std::fs::rename(&old, &new).is_ok()
            }
            Err(_) => false,
        };
        if linked {
            self.unlink_after_flush.lock().unwrap().push((old, to));
        }
        linked
    }

    /// Dropping a container's old name moved its ctime: a node in step with
    /// the server stays so (else the next start would take the container
    /// for one written while venus was down, and store it again).
    fn restamp(&self, fid: Fid) {
        let Ok(meta) = std::fs::metadata(self.container_path(fid)) else { return };
        let now = ContainerStamp::of(&meta);
        let mut nodes = self.nodes.lock().unwrap();
        if let Some(n) = nodes.get_mut(&fid) {
            match n.clean {
                Some(c) if c.same_content(&now) && c != now => {
                    n.clean = Some(now);
                    self.persist(fid, n);
                }
                _ => {}
            }
        }
    }

    /// Flushes if container names wait to be dropped (objects renumbered
    /// while connected, which flush nothing themselves).
    pub fn drop_old_names(&self) -> Result<()> {
        if self.unlink_after_flush.lock().unwrap().is_empty() {
            return Ok(());
        }
        self.flush()
    }

    /// Makes everything written so far durable, then drops container names
    /// that only a crash before this point could still need.
    pub fn flush(&self) -> Result<()> {
        self.write_deferred();
        let unlink = std::mem::take(&mut *self.unlink_after_flush.lock().unwrap());
        let durable = || -> Result<()> {
            self.db.flush()?;
            self.log.sync_data()?;
            Ok(())
        };
        if let Err(e) = durable() {
            self.unlink_after_flush.lock().unwrap().extend(unlink);
            return Err(e);
        }
        for (old, to) in unlink {
            let _ = std::fs::remove_file(old);
            self.restamp(to);
        }
        Ok(())
    }

    /// The mount-relative path of an object, from its parent pointers.
    pub fn path_of(&self, fid: Fid) -> String {
        let nodes = self.nodes.lock().unwrap();
        let mut names = Vec::new();
        let mut cur = fid;
        for _ in 0..4096 {
            if cur == Fid::ROOT {
                break;
            }
            match nodes.get(&cur).and_then(|n| n.parent.clone()) {
                Some((p, name)) => {
                    names.push(name);
                    cur = p;
                }
                None => {
                    names.push(format!("<{fid}>"));
                    break;
                }
            }
        }
        names.reverse();
        format!("/{}", names.join("/"))
    }

    /// Whether `fid` is `ancestor` or lies below it.
    pub fn is_within(&self, fid: Fid, ancestor: Fid) -> bool {
        let nodes = self.nodes.lock().unwrap();
        let mut cur = fid;
        for _ in 0..4096 {
            if cur == ancestor {
                return true;
            }
            match nodes.get(&cur).and_then(|n| n.parent.as_ref().map(|p| p.0)) {
                Some(p) => cur = p,
                None => return false,
            }
        }
        false
    }

    /// Eviction candidates, least recently used first: containers that are
    /// clean and not in `open` (stale ones included). A file with a local
    /// fid is never one: the server does not have it yet (a create waiting
    /// for its first close, or one in the log), so its container is the
    /// only copy, even when nothing marks it dirty.
    pub fn eviction_order(&self, open: &dyn Fn(Fid) -> bool) -> Vec<(Fid, u64)> {
        let nodes = self.nodes.lock().unwrap();
        let sizes = self.sizes.lock().unwrap();
        // Unhoarded first, then the lowest hoard priorities; LRU within each.
        let mut c: Vec<(u32, u64, Fid, u64)> = nodes
            .iter()
            .filter(|(f, n)| !f.is_local() && !n.dirty && !open(**f))
            .filter_map(|(f, n)| sizes.get(f).map(|s| (n.hoard, n.last_used, *f, *s)))
            .collect();
        c.sort_unstable();
        c.into_iter().map(|(_, _, f, s)| (f, s)).collect()
    }
}

/// Creates `containers` and its shards. The top-of-hierarchy flag must be
/// set before the shards are made: it decides where they are placed.
fn make_container_dirs(root: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(root)?;
    common::mark_top_dir(root);
    for i in 0..SHARDS {
        match std::fs::create_dir(root.join(format!("{i:02x}"))) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// Every file under `containers`: those in the shards, and any left at the
/// top by a cache made before the shards existed.
fn container_entries(root: &Path) -> std::io::Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            for inner in std::fs::read_dir(entry.path())? {
                let inner = inner?;
                out.push((inner.path(), inner.metadata()?));
            }
        } else {
            out.push((entry.path(), meta));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_attr(fid: Fid, size: u64) -> Attr {
        Attr {
            fid,
            kind: FileKind::File,
            size,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            atime: Timestamp::default(),
            mtime: Timestamp::default(),
            ctime: Timestamp::default(),
            version: Default::default(),
        }
    }

    /// A cache made before the shards: its containers sit directly in
    /// `containers/`. Opening it moves each into its shard; a clean one
    /// stays clean (the move is not an edit), a dirty one stays dirty, and
    /// a leftover fetch temporary goes.
    #[test]
    fn containers_of_an_unsharded_cache_move_into_their_shards() {
        let dir = std::env::temp_dir().join(format!("venus-cache-test-{}", Uuid::new_v4().simple()));
        let (clean, dirty) = (Fid(300), Fid(301));
        {
            let cache = Cache::open(&dir, 1 << 30).unwrap();
            for (fid, text) in [(clean, "clean"), (dirty, "dirty")] {
                let old = dir.join("containers").join(fid.0.to_string());
                std::fs::write(&old, text).unwrap();
                let stamp = ContainerStamp::of(&std::fs::metadata(&old).unwrap());
                cache.learn(fid, file_attr(fid, text.len() as u64), None, None);
                cache.update(fid, |n| {
                    n.cached = true;
                    n.dirty = fid == dirty;
                    n.clean = (fid == clean).then_some(stamp);
                });
            }
            std::fs::write(dir.join("containers").join("7.fetch-abc"), "partial").unwrap();
            cache.flush().unwrap();
        }
        let cache = Cache::open(&dir, 1 << 30).unwrap();
        cache.scan_containers(&HashSet::new()).unwrap();
        for (fid, text) in [(clean, "clean"), (dirty, "dirty")] {
            assert_eq!(std::fs::read_to_string(cache.container_path(fid)).unwrap(), text);
            assert!(!dir.join("containers").join(fid.0.to_string()).exists());
        }
        let c = cache.get(clean).unwrap();
        assert!(c.cached && !c.dirty, "moving a clean container does not make it dirty");
        assert_eq!(c.clean, Some(ContainerStamp::of(&std::fs::metadata(cache.container_path(clean)).unwrap())));
        assert!(cache.get(dirty).unwrap().dirty);
        assert!(!dir.join("containers").join("7.fetch-abc").exists());
        let shards = std::fs::read_dir(dir.join("containers")).unwrap().count();
        assert_eq!(shards as u64, SHARDS);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new file whose server create waits for its first close has a
    /// clean-looking container that is its only copy: eviction passes it
    /// over, and takes the server file beside it.
    #[test]
    fn eviction_never_takes_a_file_the_server_does_not_have() {
        let dir = std::env::temp_dir().join(format!("venus-cache-test-{}", Uuid::new_v4().simple()));
        let cache = Cache::open(&dir, 1 << 30).unwrap();
        let (new, fetched) = (Fid::local(7), Fid(700));
        for fid in [new, fetched] {
            std::fs::write(cache.container_path(fid), "data").unwrap();
            let stamp = ContainerStamp::of(&std::fs::metadata(cache.container_path(fid)).unwrap());
            let mut node = Node::new(file_attr(fid, 4), Some((Fid::ROOT, fid.0.to_string())));
            node.cached = true;
            node.clean = Some(stamp);
            cache.insert(fid, node);
            cache.set_size(fid, 4);
        }
        assert_eq!(cache.eviction_order(&|_| false), vec![(fetched, 4)]);
        drop(cache);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn dir_node(fid: Fid, parent: Option<(Fid, &str)>, entries: &[(&str, Fid, FileKind)]) -> Node {
        let mut attr = file_attr(fid, 0);
        attr.kind = FileKind::Dir;
        let mut n = Node::new(attr, parent.map(|(p, name)| (p, name.to_string())));
        n.entries = Some(entries.iter().map(|(name, f, k)| (name.to_string(), (*f, *k))).collect());
        n
    }

    /// A local fid that gets its server fid: the listing naming it and the
    /// children naming it as parent follow, on the quick path (one name)
    /// and on the full one (a file with a second name in another
    /// directory); unrelated nodes keep what they had.
    #[test]
    fn renumbering_repoints_listings_and_children() {
        let dir = std::env::temp_dir().join(format!("venus-cache-test-{}", Uuid::new_v4().simple()));
        let cache = Cache::open(&dir, 1 << 30).unwrap();
        let (d, f, linked, other) = (Fid::local(1), Fid::local(2), Fid::local(3), Fid::local(4));
        let (d2, f2, linked2) = (Fid(502), Fid(503), Fid(504));
        let file = FileKind::File;
        cache.insert(Fid::ROOT, dir_node(Fid::ROOT, None, &[("d", d, FileKind::Dir), ("other", other, file)]));
        cache.insert(d, dir_node(d, Some((Fid::ROOT, "d")), &[("f", f, file), ("l", linked, file)]));
        cache.insert(f, Node::new(file_attr(f, 1), Some((d, "f".into()))));
        let mut l = file_attr(linked, 1);
        l.nlink = 2;
        cache.insert(linked, Node::new(l, Some((d, "l".into()))));
        cache.update(Fid::ROOT, |n| n.entries.as_mut().unwrap().insert("l2".into(), (linked, file)));
        cache.insert(other, Node::new(file_attr(other, 1), Some((Fid::ROOT, "other".into()))));

        cache.renumber(d, d2);
        let entry = |dir: Fid, name: &str| cache.view(dir, |n| n.entries.as_ref().unwrap()[name].0).unwrap();
        let parent = |fid: Fid| cache.view(fid, |n| n.parent.clone().unwrap().0).unwrap();
        assert!(cache.view(d, |_| ()).is_none(), "the node moved");
        assert_eq!(entry(Fid::ROOT, "d"), d2);
        assert_eq!((parent(f), parent(linked)), (d2, d2));

        cache.renumber(f, f2);
        assert_eq!(entry(d2, "f"), f2);
        assert_eq!(parent(f2), d2);

        cache.renumber(linked, linked2);
        assert_eq!((entry(d2, "l"), entry(Fid::ROOT, "l2")), (linked2, linked2), "both names follow");
        assert_eq!(entry(Fid::ROOT, "other"), other);
        assert_eq!(parent(other), Fid::ROOT);
        drop(cache);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
