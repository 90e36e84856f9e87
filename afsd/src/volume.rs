//! The volume: the export directory plus the database that gives its objects
//! identities and versions.
//!
//! Every mutation goes the same way ([`Volume::execute`]):
//! 1. under the stripe locks of the objects involved, decide the outcome and
//!    build a [`Plan`]: record changes, the reply, and an [`Intent`] saying
//!    what to do on disk;
//! 2. commit the plan, the reply and the intent together (all or none after
//!    a crash: [`db::Db::commit`]) and flush it (group commit) -- from here
//!    the mutation has happened, and a retransmission gets the recorded reply;
//! 3. apply the intent to the export (every intent is idempotent, so startup
//!    recovery simply applies whatever intents are left);
//! 4. record what the disk now looks like, drop the intent, break callbacks.
//!
//! A crash between 2 and 3 is repaired at the next start; a crash before 2
//! leaves nothing (staged data sits in the staging area, which is emptied at
//! start). So a store is atomic and no temporary file is left in the export.

use crate::callbacks::Callbacks;
use crate::db::{self, db_err, dirent_key, fid_key, reply_key, tx_err, Db, Object, RecordedReply, Seen};
use crate::export::{self, Dir, Export, RelPath, Stat};
use crate::handles::Handles;
use crate::settle::{self, Settler};
use crate::stats::Stats;
use common::proto::{OpKind, Reply, Xid};
use common::{Attr, DirEntry, Fid, FileKind, FsError, SetAttr, Timestamp, VersionVector};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sled::transaction::{ConflictableTransactionError, Transactional};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use uuid::Uuid;

const STRIPES: usize = 1024;
/// Longest parent chain followed when building a path (a loop guard).
const MAX_DEPTH: usize = 4096;
/// See [`Volume::settling`].
pub struct Settling<'a> {
    vol: &'a Volume,
    fids: Vec<Fid>,
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        let mut map = self.vol.settling.lock().unwrap();
        for f in &self.fids {
            if let Some(n) = map.get_mut(f) {
                *n -= 1;
                if *n == 0 {
                    map.remove(f);
                }
            }
        }
    }
}

/// What a commit does to the intents tree: records the plan's intent (if
/// any), or takes back one a failed change left (if any).
enum IntentChange<'a> {
    Record(Option<&'a Intent>),
    TakeBack(Option<u64>),
}

/// Objects adopted per transaction (see [`Volume::adopt_all`]).
const ADOPT_BATCH: usize = 256;

/// What a new name is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NewKind {
    File,
    Dir,
    Symlink(String),
}

/// A change to the export, decided and committed but perhaps not yet made.
/// Applying one twice has the same effect as applying it once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Intent {
    Create {
        dir: Vec<String>,
        name: String,
        mode: u32,
        mtime: Timestamp,
        what: NewKind,
        /// The new object; recovery redoes the create wherever the
        /// database says it is now (none in intents of older versions).
        #[serde(default)]
        fid: Option<Fid>,
    },
    /// Move a staged file over the target (a store), then make the
    /// object's other hard links (`others`) names of the new file too.
    Install {
        staging: String,
        dir: Vec<String>,
        name: String,
        #[serde(default)]
        others: Vec<(Vec<String>, String)>,
        /// A new file (a create with content): nothing may be replaced.
        #[serde(default)]
        new: bool,
    },
    /// Write small content into the file `dir/name` in place (a store into
    /// an empty file; see `ops.rs`). `version` is the one the store made:
    /// recovery redoes the write only while the object still has it.
    Fill {
        fid: Fid,
        version: VersionVector,
        dir: Vec<String>,
        name: String,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        mode: u32,
        mtime: Timestamp,
    },
    Remove {
        dir: Vec<String>,
        name: String,
        is_dir: bool,
    },
    Rename {
        from_dir: Vec<String>,
        from: String,
        to_dir: Vec<String>,
        to: String,
    },
    Link {
        from_dir: Vec<String>,
        from: String,
        dir: Vec<String>,
        name: String,
    },
    SetAttr {
        path: Vec<String>,
        set: SetAttr,
    },
}

impl Intent {
    /// Whether applying it waits for the disk: it syncs the export itself.
    /// A create or fill only writes small content to the page cache and
    /// leaves its fsyncs to the settler (see `settle.rs`).
    fn waits_for_the_disk(&self) -> bool {
        !matches!(self, Intent::Create { .. } | Intent::Fill { .. })
    }
}

/// The database side of one mutation.
#[derive(Default)]
pub struct Plan {
    pub objects: Vec<(Fid, Option<Object>)>,
    pub dirents: Vec<(Fid, String, Option<Fid>)>,
    pub intent: Option<Intent>,
    /// Objects whose on-disk state to record after applying.
    pub reseen: Vec<Fid>,
    /// Objects whose promises to break (the caller's are kept).
    pub breaks: Vec<Fid>,
}

pub struct Volume {
    pub export: Export,
    pub db: Arc<Db>,
    /// Names the server in version vectors, for edits made directly in the export.
    pub server_id: Uuid,
    pub volume_id: Uuid,
    pub staging_path: PathBuf,
    staging: Dir,
    /// The staging directory's name when it lives inside the export root.
    pub staging_in_export: Option<String>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    pub callbacks: Arc<Callbacks>,
    /// Breaks sent by a client's changes and not yet acknowledged: the
    /// reply to the change waits for them, after its locks are released.
    pending_breaks: std::sync::Mutex<std::collections::HashMap<Uuid, Vec<tokio::task::JoinHandle<()>>>>,
    /// Objects the server is changing without their stripes (see `settling`).
    settling: std::sync::Mutex<std::collections::HashMap<Fid, usize>>,
    pub handles: Handles,
    pub stats: Stats,
    /// Export fsyncs deferred behind the log (see `settle.rs`).
    pub settler: Settler,
    failpoint: Option<String>,
    /// Held shared by every namespace mutation from planning to applying,
    /// exclusive by a rename of a directory (which moves the paths below it).
    pub ns_lock: tokio::sync::RwLock<()>,
    /// Serialises reintegration batches per client.
    reintegrating: std::sync::Mutex<std::collections::HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
}

pub type Guards<'a> = Vec<tokio::sync::MutexGuard<'a, ()>>;

impl Volume {
    pub fn new(
        export: Export,
        db: Arc<Db>,
        staging_path: PathBuf,
        staging_in_export: Option<String>,
    ) -> Result<Volume, FsError> {
        let server_id = db.meta_uuid(db::META_SERVER)?;
        let volume_id = db.meta_uuid(db::META_VOLUME)?;
        let staging = export::open_dir_path(&staging_path)?;
        Ok(Volume {
            export,
            callbacks: Arc::new(Callbacks::new(db.clone())),
            pending_breaks: Default::default(),
            settling: Default::default(),
            handles: Handles::new(staging_path.clone()),
            db,
            server_id,
            volume_id,
            staging_path,
            staging,
            staging_in_export,
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            stats: Stats::default(),
            settler: Settler::default(),
            failpoint: std::env::var("AFSD_FAILPOINT").ok(),
            ns_lock: tokio::sync::RwLock::new(()),
            reintegrating: Default::default(),
        })
    }

    /// Makes sure the root object exists.
    pub fn init_root(&self) -> Result<(), FsError> {
        if self.db.object(Fid::ROOT)?.is_none() {
            let st = self.export.lstat(&RelPath::root())?;
            let obj = Object { kind: FileKind::Dir, names: vec![], version: VersionVector::new(), seen: (&st).into() };
            self.db.objects.insert(fid_key(Fid::ROOT), db::encode(&obj)).map_err(db_err)?;
        }
        Ok(())
    }

    // ---- locking --------------------------------------------------------------

    /// Locks the stripes of these fids in a fixed order (so two operations
    /// never wait on each other in a cycle).
    pub async fn lock(&self, fids: &[Fid]) -> Guards<'_> {
        let mut idx: Vec<usize> = fids.iter().map(|f| (f.0 as usize) % STRIPES).collect();
        idx.sort_unstable();
        idx.dedup();
        let mut guards = Vec::with_capacity(idx.len());
        for i in idx {
            guards.push(self.stripes[i].lock().await);
        }
        guards
    }

    /// Marks `fids` as being changed by the server itself, without their
    /// stripes held, until the returned guard is dropped: checks for outside
    /// edits leave them alone meanwhile (see [`Volume::notice_external`]).
    pub fn settling(&self, fids: Vec<Fid>) -> Settling<'_> {
        let mut map = self.settling.lock().unwrap();
        for f in &fids {
            *map.entry(*f).or_default() += 1;
        }
        Settling { vol: self, fids }
    }

    pub fn covered(fids: &[Fid], more: &[Fid]) -> bool {
        let set: Vec<usize> = fids.iter().map(|f| (f.0 as usize) % STRIPES).collect();
        more.iter().all(|f| set.contains(&((f.0 as usize) % STRIPES)))
    }

    // ---- records and paths -------------------------------------------------------

    pub fn object(&self, fid: Fid) -> Result<Object, FsError> {
        self.db.object(fid)?.ok_or(FsError::Stale)
    }

    /// The path of an object, from its first name up to the root.
    pub fn path_of(&self, fid: Fid) -> Result<RelPath, FsError> {
        let mut names = Vec::new();
        let mut cur = fid;
        for _ in 0..MAX_DEPTH {
            if cur == Fid::ROOT {
                names.reverse();
                return RelPath::from_names(names);
            }
            let obj = self.object(cur)?;
            let (parent, name) = obj.names.first().cloned().ok_or(FsError::Stale)?;
            names.push(name);
            cur = parent;
        }
        Err(FsError::Loop)
    }

    /// Opens directory `fid`, checking that what is at its path really is
    /// that directory (a concurrent rename of an ancestor could otherwise
    /// point the path at another one).
    pub fn open_dir(&self, fid: Fid) -> Result<(Dir, RelPath), FsError> {
        self.open_dir_tries(fid, 5)
    }

    /// [`Volume::open_dir`], trying `tries` times: between tries it sleeps
    /// (4 to 32 ms) for a rename being applied to finish.
    fn open_dir_tries(&self, fid: Fid, tries: u32) -> Result<(Dir, RelPath), FsError> {
        let mut last = FsError::Stale;
        for attempt in 0..tries {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(2 << attempt));
            }
            let obj = self.object(fid)?;
            if obj.kind != FileKind::Dir {
                return Err(FsError::NotDir);
            }
            let path = self.path_of(fid)?;
            match self.export.dir(&path) {
                Ok(d) => {
                    let st = d.fstat()?;
                    if st.ino == obj.seen.ino || obj.seen.ino == 0 {
                        return Ok((d, path));
                    }
                    last = FsError::Stale;
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub fn attr(&self, fid: Fid, obj: &Object, st: &Stat) -> Attr {
        Attr {
            fid,
            kind: obj.kind,
            size: st.size,
            mode: st.mode & 0o7777,
            nlink: st.nlink,
            uid: st.uid,
            gid: st.gid,
            atime: st.atime,
            mtime: st.mtime,
            ctime: st.ctime,
            version: obj.version.clone(),
        }
    }

    pub fn kind_of(st: &Stat) -> Option<FileKind> {
        if st.is_file() {
            Some(FileKind::File)
        } else if st.is_dir() {
            Some(FileKind::Dir)
        } else if st.is_symlink() {
            Some(FileKind::Symlink)
        } else {
            None
        }
    }

    /// Current on-disk state of `fid`.
    pub fn stat_of(&self, fid: Fid) -> Result<Stat, FsError> {
        self.stat_tries(fid, 5)
    }

    /// [`Volume::stat_of`] without waiting for a rename to finish, for the
    /// export watcher: after a tree is removed behind the server's back,
    /// the retries' sleeps, a worker blocked 60 ms for each object in it,
    /// held every request and a shutdown up for minutes. An object missed
    /// here is checked again when it is next used.
    pub fn stat_at_once(&self, fid: Fid) -> Result<Stat, FsError> {
        self.stat_tries(fid, 1)
    }

    fn stat_tries(&self, fid: Fid, tries: u32) -> Result<Stat, FsError> {
        if fid == Fid::ROOT {
            return self.export.lstat(&RelPath::root());
        }
        let obj = self.object(fid)?;
        let (parent, name) = obj.names.first().cloned().ok_or(FsError::Stale)?;
        let (dir, _) = self.open_dir_tries(parent, tries)?;
        dir.lstat(&name).map_err(|e| if e == FsError::NotFound { FsError::Stale } else { e })
    }

    /// Whether `name` should be hidden (the staging area inside the export).
    pub fn hidden(&self, dir: Fid, name: &str) -> bool {
        dir == Fid::ROOT && self.staging_in_export.as_deref() == Some(name)
    }

    /// The object named `name` in `dir`, as it is on disk now. Objects that
    /// appeared behind the server's back get a fid here; objects changed
    /// behind its back get a new version.
    pub async fn resolve(&self, dir: Fid, name: &str) -> Result<(Fid, Object, Stat), FsError> {
        common::error::validate_name(name)?;
        let (d, _) = self.open_dir(dir)?;
        let (fid, obj, st) = self.resolve_locked(&d, dir, name)?.ok_or(FsError::NotFound)?;
        let obj = self.notice_external(fid, obj, &st, false).await?;
        Ok((fid, obj, st))
    }

    /// Like [`Volume::resolve`], for a caller with an open `dir` (and
    /// without noticing outside edits); `None` when the name does not exist.
    pub fn resolve_locked(&self, dir: &Dir, dir_fid: Fid, name: &str) -> Result<Option<(Fid, Object, Stat)>, FsError> {
        let Some((st, kind, known)) = self.on_disk(dir, dir_fid, name)? else { return Ok(None) };
        let fid = match known {
            Some(fid) => fid,
            None => self.adopt(dir_fid, name, kind, &st)?,
        };
        let obj = self.object(fid)?;
        Ok(Some((fid, obj, st)))
    }

    /// What `name` is on disk now, and its fid if the server already knows
    /// it as an object of that kind; `None` for a hidden or absent name and
    /// for devices, FIFOs and sockets, which are not part of the volume.
    fn on_disk(&self, dir: &Dir, dir_fid: Fid, name: &str) -> Result<Option<(Stat, FileKind, Option<Fid>)>, FsError> {
        if self.hidden(dir_fid, name) {
            return Ok(None);
        }
        let st = match dir.lstat(name) {
            Ok(st) => st,
            Err(FsError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(kind) = Self::kind_of(&st) else { return Ok(None) };
        let known = match self.db.dirent(dir_fid, name)? {
            Some(fid) => self.db.object(fid)?.filter(|o| o.kind == kind).map(|_| fid),
            None => None,
        };
        Ok(Some((st, kind, known)))
    }

    /// The entries of an open directory, as they are on disk now (see
    /// [`Volume::resolve_locked`]), with the objects that appeared behind
    /// the server's back adopted in batches.
    pub fn entries_locked(&self, dir: &Dir, dir_fid: Fid, names: &[String]) -> Result<Vec<DirEntry>, FsError> {
        let mut entries = Vec::with_capacity(names.len());
        let mut found = Vec::new();
        for name in names {
            match self.on_disk(dir, dir_fid, name)? {
                Some((_, kind, Some(fid))) => entries.push(DirEntry { name: name.clone(), fid, kind }),
                Some((st, kind, None)) => found.push((name.clone(), kind, st)),
                None => {}
            }
        }
        let fids = self.adopt_all(dir_fid, &found)?;
        for ((name, kind, _), fid) in found.into_iter().zip(fids) {
            entries.push(DirEntry { name, fid, kind });
        }
        Ok(entries)
    }

    /// Gives an object found on disk a fid (or re-points a name whose
    /// object changed kind). Safe to race: the transaction re-checks.
    fn adopt(&self, dir: Fid, name: &str, kind: FileKind, st: &Stat) -> Result<Fid, FsError> {
        let found = [(name.to_string(), kind, *st)];
        Ok(self.adopt_all(dir, &found)?[0])
    }

    /// [`Volume::adopt`] for many names of one directory, in transactions
    /// of [`ADOPT_BATCH`]: a first listing of a directory of 10,000 files
    /// made behind the server's back is 40 commits, not 10,000 (and a
    /// burst of sled writes that size is what sled's IO pool chokes on,
    /// see `common::sled_watchdog`).
    pub fn adopt_all(&self, dir: Fid, found: &[(String, FileKind, Stat)]) -> Result<Vec<Fid>, FsError> {
        let mut fids = Vec::with_capacity(found.len());
        for chunk in found.chunks(ADOPT_BATCH) {
            let fresh: Vec<Fid> = chunk.iter().map(|_| self.new_fid()).collect::<Result<_, _>>()?;
            let items: Vec<(Vec<u8>, Object)> = chunk
                .iter()
                .map(|(name, kind, st)| {
                    let mut version = VersionVector::new();
                    version.increment(self.server_id);
                    let obj = Object { kind: *kind, names: vec![(dir, name.clone())], version, seen: st.into() };
                    (dirent_key(dir, name), obj)
                })
                .collect();
            let db = &self.db;
            let got = (&db.objects, &db.dirents, &db.meta)
                .transaction(|(objects, dirents, meta)| {
                    let mut got = Vec::with_capacity(items.len());
                    for ((key, new_obj), fresh) in items.iter().zip(&fresh) {
                        let name = &new_obj.names[0].1;
                        if let Some(v) = dirents.get(key)? {
                            let old = Fid(db::be_u64(&v));
                            if let Some(o) = objects.get(fid_key(old))? {
                                let mut o: Object = db::decode(&o).map_err(ConflictableTransactionError::Abort)?;
                                if o.kind == new_obj.kind {
                                    got.push(old);
                                    continue;
                                }
                                o.names.retain(|(p, n)| !(*p == dir && n == name));
                                if o.names.is_empty() {
                                    objects.remove(&fid_key(old))?;
                                } else {
                                    objects.insert(&fid_key(old), db::encode(&o))?;
                                }
                            }
                        }
                        objects.insert(&fid_key(*fresh), db::encode(new_obj))?;
                        dirents.insert(key.as_slice(), &fresh.0.to_be_bytes())?;
                        got.push(*fresh);
                    }
                    bump_stamp(meta)?;
                    Ok(got)
                })
                .map_err(tx_err)?;
            let adopted = got.iter().zip(&fresh).filter(|(g, f)| g == f).count();
            if adopted > 0 {
                tracing::info!(%dir, adopted, "adopted objects created directly in the export");
            }
            fids.extend(got);
        }
        Ok(fids)
    }

    /// Compares a fresh `lstat` with what the server last recorded; a
    /// difference is an edit made behind the server's back: the object gets
    /// a new version and its promises are broken. `held` is true when the
    /// caller already holds the namespace lock and the object's stripe, and
    /// took `st` under them.
    ///
    /// An object the server is changing itself without its stripe (a
    /// directory a store installs into) is left alone until that change has
    /// recorded its new state. The price: an outside edit of that directory
    /// within those few milliseconds is taken for part of the server's own.
    pub async fn notice_external(&self, fid: Fid, obj: Object, st: &Stat, held: bool) -> Result<Object, FsError> {
        if Seen::from(st).same_content(&obj.seen) {
            return Ok(obj);
        }
        // Judged again under the locks: a stat taken outside them may predate
        // a change the server has just recorded, and recording it would roll
        // `seen` back and bump the version of an object nobody touched. The
        // namespace lock keeps a directory rename from moving the path.
        let (_ns, _guard) =
            if held { (None, None) } else { (Some(self.ns_lock.read().await), Some(self.lock(&[fid]).await)) };
        match self.record_if_changed(fid) {
            Ok(Some(obj)) => {
                tracing::info!(%fid, version = %obj.version, "object changed directly in the export");
                self.stats.outside_edits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.callbacks.break_fids(&[fid], None).await;
                Ok(obj)
            }
            // Unchanged, being changed by the server itself, or gone from
            // disk (whoever looks next sees why).
            Ok(None) => Ok(self.object(fid).unwrap_or(obj)),
            Err(e) => Err(e),
        }
    }

    /// Compares the object with its state on disk and records a difference
    /// as an outside edit (a new version); returns the object so changed.
    /// The caller holds the locks. All of it happens under the settling
    /// table's mutex: a store that starts settling the object after this
    /// renames only after it, and one that finished has recorded the state
    /// this reads, so neither is taken for an outside edit nor undone.
    fn record_if_changed(&self, fid: Fid) -> Result<Option<Object>, FsError> {
        let settling = self.settling.lock().unwrap();
        if settling.contains_key(&fid) {
            return Ok(None);
        }
        let mut obj = self.object(fid)?;
        let Ok(st) = self.stat_of(fid) else { return Ok(None) };
        if Seen::from(&st).same_content(&obj.seen) {
            return Ok(None);
        }
        if obj.seen == Seen::default() {
            // Created by the server, which records what it made on disk only
            // after making it; a crash in between loses that record, not an
            // edit. Adopting the state as it is keeps the version.
            obj.seen = (&st).into();
            self.db.objects.insert(fid_key(fid), db::encode(&obj)).map_err(db_err)?;
            return Ok(None);
        }
        obj.version.increment(self.server_id);
        obj.seen = (&st).into();
        let encoded = db::encode(&obj);
        (&self.db.objects, &self.db.meta)
            .transaction(|(objects, meta)| {
                objects.insert(&fid_key(fid), encoded.clone())?;
                bump_stamp(meta)?;
                Ok(())
            })
            .map_err(tx_err)?;
        Ok(Some(obj))
    }

    // ---- executing mutations --------------------------------------------------------

    /// Commits a plan with its reply, applies its intent, and breaks
    /// callbacks. The caller holds the stripes of every object in the plan.
    pub async fn execute(&self, xid: &Xid, kind: OpKind, plan: Plan, reply: Reply) -> Result<Reply, FsError> {
        let before: Vec<(Fid, Option<Object>)> =
            plan.objects.iter().map(|(f, _)| Ok((*f, self.db.object(*f)?))).collect::<Result<_, FsError>>()?;
        let before_dirents: Vec<(Fid, String, Option<Fid>)> = plan
            .dirents
            .iter()
            .map(|(d, n, _)| Ok((*d, n.clone(), self.db.dirent(*d, n)?)))
            .collect::<Result<_, FsError>>()?;
        let recorded: RecordedReply = Ok(reply.clone());
        let intent_id = self.commit(
            xid,
            kind,
            &plan.objects,
            &plan.dirents,
            IntentChange::Record(plan.intent.as_ref()),
            &recorded,
        )?;
        self.sync_or_die().await;
        self.failpoint("crash-after-commit", kind);
        let mut unsynced = Vec::new();
        if let Some(intent) = &plan.intent {
            let applied = if intent.waits_for_the_disk() {
                tokio::task::block_in_place(|| self.apply(intent))
            } else {
                // On this worker: a few quick calls, dearer to hand to
                // another thread than to make.
                self.apply(intent)
            };
            match applied {
                Ok(fds) => unsynced = fds,
                Err(e) => {
                    tracing::warn!(?intent, "applying a committed change failed, rolling back: {e}");
                    // The intent goes in the same commit: recovery must not
                    // redo a change the database no longer records.
                    if let Err(c) = self.commit(
                        xid,
                        kind,
                        &before,
                        &before_dirents,
                        IntentChange::TakeBack(intent_id),
                        &Err(e.clone()),
                    ) {
                        die(&format!("cannot roll back a failed change: {c}"));
                    }
                    self.sync_or_die().await;
                    return Err(e);
                }
            }
        }
        self.reseen(&plan.reseen);
        match intent_id {
            _ if unsynced.is_empty() => self.drop_intent(intent_id),
            // The intent stays until the settler has synced the export.
            Some(id) => {
                if self.settler.defer(id, unsynced) > settle::MAX_PENDING {
                    tokio::task::block_in_place(|| self.settle_now());
                }
            }
            None => unsynced.iter().for_each(sync_or_die_fd),
        }
        let holders = self.callbacks.take_holders(&plan.breaks, Some(xid.client));
        if !holders.is_empty() {
            // Sent now; awaited in `before_reply`, once the caller's locks are
            // released, so a slow holder delays only this reply.
            let callbacks = self.callbacks.clone();
            let task = tokio::spawn(async move { callbacks.send_breaks(holders).await });
            self.pending_breaks.lock().unwrap().entry(xid.client).or_default().push(task);
        }
        Ok(reply)
    }

    /// After a commit, a failed flush leaves the outcome unknown: the only
    /// safe move is to stop and let recovery decide from what is on disk.
    async fn sync_or_die(&self) {
        if let Err(e) = self.db.sync(self.db.ticket()).await {
            die(&format!("cannot flush the database after a commit: {e}"));
        }
    }

    /// Syncs the deferred export changes and drops their intents.
    pub fn settle_now(&self) {
        if self.failpoint.as_deref() == Some("hold-settle") {
            // Tests: leave every deferred intent for recovery to redo.
            return;
        }
        match self.settler.settle() {
            Ok(ids) => ids.into_iter().for_each(|id| self.drop_intent(Some(id))),
            Err(e) => die(&format!("cannot sync the export: {e}")),
        }
    }

    /// Runs the settler: each wake-up gathers changes for a moment, then
    /// syncs them together.
    pub async fn run_settler(self: Arc<Self>) {
        loop {
            self.settler.wake.notified().await;
            tokio::time::sleep(settle::GATHER).await;
            let vol = self.clone();
            let _ = tokio::task::spawn_blocking(move || vol.settle_now()).await;
        }
    }

    fn drop_intent(&self, id: Option<u64>) {
        if let Some(id) = id {
            // Not flushed: if this is lost, recovery re-applies an
            // idempotent intent, which changes nothing.
            let _ = self.db.intents.remove(id.to_be_bytes());
        }
    }

    fn failpoint(&self, at: &str, kind: OpKind) {
        if let Some(fp) = &self.failpoint {
            if fp.strip_prefix(at).and_then(|r| r.strip_prefix(':')) == Some(kind.name()) {
                tracing::error!("failpoint {fp}: aborting");
                std::process::abort();
            }
        }
    }

    pub async fn before_reply(&self, xid: &Xid, kind: OpKind) {
        // Breaks come only from mutations, and only mutations wait for them:
        // a read (a chunk read answered in the connection's reader, say) must
        // not take up, and wait on, the breaks of a mutation the same client
        // has running beside it.
        let pending = match kind.mutates() {
            true => self.pending_breaks.lock().unwrap().remove(&xid.client).unwrap_or_default(),
            false => Vec::new(),
        };
        for task in pending {
            let _ = task.await;
        }
        self.failpoint("crash-before-reply", kind);
    }

    fn commit(
        &self,
        xid: &Xid,
        kind: OpKind,
        objects: &[(Fid, Option<Object>)],
        dirents: &[(Fid, String, Option<Fid>)],
        intent: IntentChange,
        reply: &RecordedReply,
    ) -> Result<Option<u64>, FsError> {
        let (intent, drop_intent) = match intent {
            IntentChange::Record(i) => (i, None),
            IntentChange::TakeBack(id) => (None, id),
        };
        let intent_id = match intent {
            Some(_) => Some(self.db.db.generate_id().map_err(db_err)?),
            None => None,
        };
        let commit = db::Commit {
            objects: objects
                .iter()
                .map(|(f, o)| (fid_key(*f), o.as_ref().map(|o| ByteBuf::from(db::encode(o)))))
                .collect(),
            dirents: dirents
                .iter()
                .map(|(d, n, f)| (ByteBuf::from(dirent_key(*d, n)), f.map(|f| f.0.to_be_bytes())))
                .collect(),
            reply: (ByteBuf::from(reply_key(xid.client, xid.seq)), ByteBuf::from(db::encode(reply))),
            intent: intent_id.zip(intent.map(|i| ByteBuf::from(db::encode(i)))),
            drop_intent,
        };
        self.db.commit(&commit, || {
            if self.failpoint.as_deref().is_some_and(|f| f.starts_with("crash-in-commit")) {
                // Tests: as if sled had written this much when the power went.
                let _ = self.db.flush_now();
                self.failpoint("crash-in-commit", kind);
            }
        })?;
        Ok(intent_id)
    }

    /// Records the on-disk state of objects just changed by the server itself.
    /// Compare-and-swap: an object whose stripe the caller does not hold (a
    /// directory a store installed into) may get a new version from another
    /// call meanwhile, which a plain write would undo.
    fn reseen(&self, fids: &[Fid]) {
        for &fid in fids {
            for _ in 0..8 {
                let Ok(Some(old)) = self.db.objects.get(fid_key(fid)) else { break };
                let Ok(mut obj) = db::decode::<Object>(&old) else { break };
                let Ok(st) = self.stat_of(fid) else { break };
                obj.seen = (&st).into();
                match self.db.objects.compare_and_swap(fid_key(fid), Some(&old), Some(db::encode(&obj))) {
                    Ok(Ok(())) | Err(_) => break,
                    Ok(Err(_)) => continue,
                }
            }
        }
    }

    /// Makes the export match an intent. Idempotent. Creates and fills
    /// return the descriptors whose fsyncs make them durable (a fill that
    /// made the file: the file and its directory), for the caller to sync
    /// (now, or deferred: see `settle.rs`); every other change is durable
    /// when this returns.
    pub fn apply(&self, intent: &Intent) -> Result<Vec<std::fs::File>, FsError> {
        let rel = |v: &Vec<String>| RelPath::from_names(v.clone());
        match intent {
            Intent::Create { dir, name, mode, mtime, what, .. } => {
                let d = self.export.dir(&rel(dir)?)?;
                // What is already there was made by this intent before a
                // crash, or by a later change: it is left as it is.
                match what {
                    NewKind::File => match d.open(name, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, *mode) {
                        Ok(f) => {
                            f.set_permissions(std::fs::Permissions::from_mode(*mode))?;
                            f.set_modified((*mtime).into())?;
                        }
                        Err(FsError::Exists) => {}
                        Err(e) => return Err(e),
                    },
                    NewKind::Dir => match d.mkdir(name, *mode) {
                        Ok(()) => d.set_times(name, Some(*mtime), Some(*mtime))?,
                        Err(FsError::Exists) => {}
                        Err(e) => return Err(e),
                    },
                    NewKind::Symlink(target) => match d.symlink(target, name) {
                        Ok(()) | Err(FsError::Exists) => {}
                        Err(e) => return Err(e),
                    },
                }
                Ok(vec![d.into_file()])
            }
            Intent::Install { staging, dir, name, others, new } => {
                let d = self.export.dir(&rel(dir)?)?;
                match d.rename_from(&self.staging, staging, name, *new) {
                    Ok(()) => d.sync()?,
                    // Already installed before a crash.
                    Err(FsError::NotFound) if self.staging.lstat(staging).is_err() => {}
                    Err(e) => return Err(e),
                }
                // Each other name is replaced by a link to the new file, one
                // atomic rename at a time; redoing this after a crash is
                // harmless, as `name` already holds the new file.
                for (i, (odir, oname)) in others.iter().enumerate() {
                    let od = self.export.dir(&rel(odir)?)?;
                    let tmp = format!("{staging}.link{i}");
                    match self.staging.link_from(&d, name, &tmp) {
                        Ok(()) => {}
                        Err(FsError::Exists) => {
                            self.staging.unlink(&tmp)?;
                            self.staging.link_from(&d, name, &tmp)?;
                        }
                        Err(e) => return Err(e),
                    }
                    od.rename_from(&self.staging, &tmp, oname, false)?;
                    od.sync()?;
                }
                Ok(Vec::new())
            }
            Intent::Fill { dir, name, data, mode, mtime, .. } => {
                use std::os::unix::fs::FileExt;
                let d = self.export.dir(&rel(dir)?)?;
                // The commit says this is the file's content: it is written
                // whatever happened to the file since (after a crash, even
                // its creation may not have reached the disk).
                // Non-blocking, and only a regular file: the name may be a
                // FIFO or a device made in the export behind the database's
                // back (a create with content finds it there, say).
                let (f, created) = match d.open(name, libc::O_WRONLY | libc::O_NONBLOCK, 0) {
                    Ok(f) if f.metadata()?.is_file() => (f, false),
                    Ok(_) => return Err(FsError::Exists),
                    Err(FsError::NotFound) => {
                        (d.open(name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, *mode)?, true)
                    }
                    Err(e) => return Err(e),
                };
                f.write_all_at(data, 0)?;
                f.set_len(data.len() as u64)?;
                f.set_permissions(std::fs::Permissions::from_mode(*mode))?;
                f.set_modified((*mtime).into())?;
                // A new file's name is synced with its content (a create
                // with content, or a redo after a crash).
                Ok(if created { vec![f, d.into_file()] } else { vec![f] })
            }
            Intent::Remove { dir, name, is_dir } => {
                let d = self.export.dir(&rel(dir)?)?;
                let r = if *is_dir { d.rmdir(name) } else { d.unlink(name) };
                match r {
                    Ok(()) | Err(FsError::NotFound) => d.sync().map(|()| Vec::new()),
                    Err(e) => Err(e),
                }
            }
            Intent::Rename { from_dir, from, to_dir, to } => {
                let fd = self.export.dir(&rel(from_dir)?)?;
                let td = self.export.dir(&rel(to_dir)?)?;
                match td.rename_from(&fd, from, to, false) {
                    Ok(()) => {}
                    Err(FsError::NotFound) if td.lstat(to).is_ok() => {}
                    Err(e) => return Err(e),
                }
                td.sync()?;
                fd.sync().map(|()| Vec::new())
            }
            Intent::Link { from_dir, from, dir, name } => {
                let fd = self.export.dir(&rel(from_dir)?)?;
                let d = self.export.dir(&rel(dir)?)?;
                match d.link_from(&fd, from, name) {
                    Ok(()) | Err(FsError::Exists) => d.sync().map(|()| Vec::new()),
                    Err(e) => Err(e),
                }
            }
            Intent::SetAttr { path, set } => self.apply_setattr(&rel(path)?, set).map(|()| Vec::new()),
        }
    }

    fn apply_setattr(&self, path: &RelPath, set: &SetAttr) -> Result<(), FsError> {
        let st = self.export.lstat(path)?;
        if st.is_symlink() {
            let (parent, name) = path.split_last().ok_or(FsError::Invalid("root is not a symlink".into()))?;
            let d = self.export.dir(&parent)?;
            if set.uid.is_some() || set.gid.is_some() {
                d.chown(name, set.uid, set.gid)?;
            }
            if set.atime.is_some() || set.mtime.is_some() {
                d.set_times(name, set.atime, set.mtime)?;
            }
            return Ok(());
        }
        let flags = if st.is_dir() {
            libc::O_RDONLY | libc::O_DIRECTORY
        } else if set.size.is_some() {
            libc::O_WRONLY
        } else {
            libc::O_RDONLY
        };
        let f = self.export.open_file(path, flags)?;
        if let Some(size) = set.size {
            if st.is_dir() {
                return Err(FsError::IsDir);
            }
            f.set_len(size)?;
        }
        if set.uid.is_some() || set.gid.is_some() {
            std::os::unix::fs::fchown(&f, set.uid, set.gid)?;
        }
        if let Some(mode) = set.mode {
            f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
        }
        if set.atime.is_some() || set.mtime.is_some() {
            let mut times = std::fs::FileTimes::new();
            if let Some(a) = set.atime {
                times = times.set_accessed(a.into());
            }
            if let Some(m) = set.mtime {
                times = times.set_modified(m.into());
            }
            f.set_times(times)?;
        }
        f.sync_all()?;
        Ok(())
    }

    /// Redoes the intents left by a crash (or by a stop before the
    /// settler ran). Run once at start, before serving.
    pub fn recover(&self) -> Result<usize, FsError> {
        let mut n = 0;
        for item in self.db.intents.iter() {
            let (k, v) = item.map_err(db_err)?;
            let intent: Intent = db::decode(&v)?;
            match self.redo(&intent) {
                Ok(()) => tracing::info!(?intent, "re-applied a change interrupted by a crash"),
                Err(e) => tracing::error!(?intent, "could not re-apply an interrupted change: {e}"),
            }
            self.db.intents.remove(k).map_err(db_err)?;
            n += 1;
        }
        self.db.db.flush().map_err(db_err)?;
        Ok(n)
    }

    /// Redoes one intent durably. A create or fill may have been followed
    /// by other changes that were applied and synced while it waited for
    /// the settler (a rename, a removal, a new store), so these two are
    /// redone from what the database says now: the object where it is now,
    /// and a fill only while its version is still the object's.
    fn redo(&self, intent: &Intent) -> Result<(), FsError> {
        let at_current_path = |fid: Fid| -> Result<Option<(Vec<String>, String)>, FsError> {
            if self.db.object(fid)?.is_none() {
                return Ok(None); // removed since
            }
            let path = self.path_of(fid)?;
            let (parent, name) = path.split_last().ok_or(FsError::Invalid("the root is not created".into()))?;
            Ok(Some((parent.names().to_vec(), name.to_string())))
        };
        let again = match intent {
            Intent::Create { fid: Some(fid), mode, mtime, what, .. } => match at_current_path(*fid)? {
                Some((dir, name)) => {
                    Intent::Create { dir, name, mode: *mode, mtime: *mtime, what: what.clone(), fid: Some(*fid) }
                }
                None => return Ok(()),
            },
            Intent::Fill { fid, version, data, mode, mtime, .. } => {
                if self.db.object(*fid)?.is_none_or(|o| o.version != *version) {
                    return Ok(()); // a later change replaced the content, durably
                }
                match at_current_path(*fid)? {
                    Some((dir, name)) => Intent::Fill {
                        fid: *fid,
                        version: version.clone(),
                        dir,
                        name,
                        data: data.clone(),
                        mode: *mode,
                        mtime: *mtime,
                    },
                    None => return Ok(()),
                }
            }
            other => other.clone(),
        };
        for fd in self.apply(&again)? {
            fd.sync_all()?;
        }
        Ok(())
    }

    /// Empties the staging area (stores that never committed).
    pub fn clear_staging(&self) -> Result<usize, FsError> {
        let mut n = 0;
        for name in self.staging.list()? {
            if name.starts_with("stage-") {
                self.staging.unlink(&name)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// A new, empty staging file: (name, file).
    pub fn new_staging_file(&self) -> Result<(String, std::fs::File), FsError> {
        let name = format!("stage-{}", Uuid::new_v4().simple());
        let f = self.staging.open(&name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, 0o600)?;
        Ok((name, f))
    }

    /// A new staging file whose inode is allocated in the block group of
    /// the directory `near` (where the stored file lives), then named in
    /// the staging area. Made in the staging directory instead, every
    /// stored file's inode would come from one group, and on ext4 without
    /// a journal each allocation there skips every inode freed in the last
    /// minutes: after a few thousand removals a store spent ~0.3 ms in
    /// that scan (measured), where this costs what a local create does.
    pub fn new_staging_file_near(&self, near: &Dir) -> Result<(String, std::fs::File), FsError> {
        let placed = near.open_unnamed(0o600).and_then(|f| {
            let name = format!("stage-{}", Uuid::new_v4().simple());
            self.staging.link_unnamed(&f, &name)?;
            Ok((name, f))
        });
        match placed {
            Ok(x) => Ok(x),
            // A filesystem without O_TMPFILE: the plain way.
            Err(_) => self.new_staging_file(),
        }
    }

    pub fn reintegration_turn(&self, client: Uuid) -> Arc<tokio::sync::Mutex<()>> {
        self.reintegrating.lock().unwrap().entry(client).or_default().clone()
    }

    pub fn stamp(&self) -> u64 {
        self.db.meta_u64(db::META_STAMP)
    }

    pub fn new_fid(&self) -> Result<Fid, FsError> {
        Ok(Fid(self.db.db.generate_id().map_err(db_err)? + 2))
    }

    pub fn recorded_reply(&self, xid: &Xid) -> Option<RecordedReply> {
        self.db.recorded_reply(xid.client, xid.seq)
    }
}

/// For a change without an intent to keep (none is deferred without one).
fn sync_or_die_fd(fd: &std::fs::File) {
    if let Err(e) = fd.sync_all() {
        die(&format!("cannot sync the export: {e}"));
    }
}

pub fn die(why: &str) -> ! {
    tracing::error!("{why}; stopping so that recovery can repair the state at the next start");
    std::process::abort();
}

fn bump_stamp(meta: &sled::transaction::TransactionalTree) -> Result<(), ConflictableTransactionError<FsError>> {
    let cur = meta.get(db::META_STAMP)?.map(|v| db::be_u64(&v)).unwrap_or(0);
    meta.insert(db::META_STAMP, &(cur + 1).to_be_bytes())?;
    Ok(())
}
