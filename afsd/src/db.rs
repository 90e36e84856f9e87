//! The server's sled database: trees, key layouts, versioned records, and
//! group commit.
//!
//! Values are stored wrapped in a version enum (`Stored::V1`) so the on-disk
//! format can evolve separately from the wire format.

use common::proto::Reply;
use common::{Fid, FileKind, FsError, Timestamp, VersionVector};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use uuid::Uuid;

/// What the server last saw of an object on disk. A difference from a fresh
/// `lstat` means someone changed the object behind the server's back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub ino: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

impl Seen {
    /// Whether two states show the same content. ctime is left out: renames,
    /// links and chmod change it, and the server's own record of them may
    /// be lost in a crash (it is written without a flush), which must not
    /// make the object look edited behind the server's back. Writes change
    /// mtime or size, and editors that save by rename change the inode.
    pub fn same_content(&self, other: &Seen) -> bool {
        self.ino == other.ino && self.size == other.size && self.mtime == other.mtime
    }
}

impl From<&crate::export::Stat> for Seen {
    fn from(s: &crate::export::Stat) -> Self {
        Seen { ino: s.ino, size: s.size, mtime: s.mtime, ctime: s.ctime }
    }
}

/// One object of the volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub kind: FileKind,
    /// Every (parent, name) under which the object is linked; the first one
    /// is used to find it on disk. Empty only for the root.
    pub names: Vec<(Fid, String)>,
    pub version: VersionVector,
    pub seen: Seen,
}

#[derive(Serialize, Deserialize)]
enum Stored<T> {
    V1(T),
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(&Stored::V1(v)).expect("records always encode")
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FsError> {
    match rmp_serde::from_slice::<Stored<T>>(bytes) {
        Ok(Stored::V1(v)) => Ok(v),
        Err(e) => Err(FsError::Io(format!("corrupt record in the server database: {e}"))),
    }
}

pub fn fid_key(fid: Fid) -> [u8; 8] {
    fid.0.to_be_bytes()
}

pub fn dirent_key(dir: Fid, name: &str) -> Vec<u8> {
    let mut k = dir.0.to_be_bytes().to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

pub fn callback_key(fid: Fid, client: Uuid) -> Vec<u8> {
    let mut k = fid.0.to_be_bytes().to_vec();
    k.extend_from_slice(client.as_bytes());
    k
}

pub fn pending_key(client: Uuid, fid: Fid) -> Vec<u8> {
    let mut k = client.as_bytes().to_vec();
    k.extend_from_slice(&fid.0.to_be_bytes());
    k
}

pub fn reply_key(client: Uuid, seq: u64) -> Vec<u8> {
    let mut k = client.as_bytes().to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// One commit: encoded records to put (`Some`) or remove (`None`) by key,
/// the recorded reply, and the intent with its id.
///
/// Byte strings are `ByteBuf`s so that they encode as one MessagePack
/// binary each: as `Vec<u8>` every byte became an integer of its own, and
/// encoding a store's intent (which carries small files' content) cost a
/// call per byte. `ByteBuf` still decodes the old form, so a journal entry
/// left by an older afsd is replayed as before (not the reverse: an older
/// afsd cannot replay an entry a crash of this one left).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Commit {
    pub objects: Vec<([u8; 8], Option<ByteBuf>)>,
    pub dirents: Vec<(ByteBuf, Option<[u8; 8]>)>,
    pub reply: (ByteBuf, ByteBuf),
    pub intent: Option<(u64, ByteBuf)>,
    /// An intent this commit takes back (a rollback's: the change failed).
    pub drop_intent: Option<u64>,
}

/// A recorded reply, as kept in the `replies` tree.
pub type RecordedReply = Result<Reply, FsError>;

pub struct Db {
    pub db: sled::Db,
    /// volume id, server id, volume stamp, clean-shutdown flag.
    pub meta: sled::Tree,
    /// fid -> Object
    pub objects: sled::Tree,
    /// (parent fid, name) -> fid
    pub dirents: sled::Tree,
    /// (fid, client) -> promise expiry (seconds since the epoch)
    pub callbacks: sled::Tree,
    /// (client, fid) -> (): breaks a client missed while away
    pub pending: sled::Tree,
    /// (client, seq) -> RecordedReply: the at-most-once reply cache
    pub replies: sled::Tree,
    /// id -> Intent: disk changes decided but maybe not yet applied
    pub intents: sled::Tree,
    /// client -> last connection time: who may hold promises
    pub clients: sled::Tree,
    /// id -> Commit: a commit whose writes may be partly applied (see
    /// [`Db::commit`]); empty whenever no commit is running.
    journal: sled::Tree,
    written: AtomicU64,
    flushed: tokio::sync::Mutex<u64>,
    /// sled's log file. sled makes a flush durable with `sync_file_range`
    /// alone (an `fsync` follows only from its 500 ms flusher thread), which
    /// persists neither the file's size nor the disk's write cache: a power
    /// cut could lose a commit already answered. `sync` adds an fdatasync
    /// of the same inode through this descriptor.
    log: std::fs::File,
}

pub const META_VOLUME: &[u8] = b"volume_id";
pub const META_SERVER: &[u8] = b"server_id";
pub const META_STAMP: &[u8] = b"stamp";
pub const META_CLEAN: &[u8] = b"clean_shutdown";

impl Db {
    pub fn open(dir: &Path) -> Result<Db, String> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .open()
            .map_err(|e| format!("cannot open the database in {}: {e}", dir.display()))?;
        let tree = |name: &str| db.open_tree(name).map_err(|e| format!("cannot open tree {name}: {e}"));
        let log_path = dir.join("db").join("db");
        let log = std::fs::File::open(&log_path).map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        Ok(Db {
            meta: tree("meta")?,
            objects: tree("objects")?,
            dirents: tree("dirents")?,
            callbacks: tree("callbacks")?,
            pending: tree("pending")?,
            replies: tree("replies")?,
            intents: tree("intents")?,
            clients: tree("clients")?,
            journal: tree("journal")?,
            db,
            written: AtomicU64::new(0),
            flushed: tokio::sync::Mutex::new(0),
            log,
        })
        .and_then(|db| {
            let replayed =
                db.replay_journal().map_err(|e| format!("cannot finish the commits a crash cut short: {e}"))?;
            if replayed > 0 {
                tracing::info!(replayed, "finished commits a crash cut short");
            }
            Ok(db)
        })
    }

    /// Makes one commit's writes, all or none after a crash, without a sled
    /// transaction. sled 0.34 makes every transaction roll its log buffer
    /// twice, and each roll woke all seven of its IO threads (one since our
    /// patch, see vendor/README.md): that herd was a third of afsd's CPU
    /// time for small creates. Instead the whole commit
    /// goes into the `journal` tree as one value (a single insert, which sled
    /// recovers whole or not at all), then each write is made, then the value
    /// is removed. sled recovers a prefix of its log, so after a crash either
    /// the journal value is gone (and every write before its removal is
    /// there) or it is still there and `replay_journal` makes the writes
    /// again; they are plain puts and removes, so making them twice is
    /// harmless (the volume stamp then moves twice, which only makes clients
    /// revalidate once more). Readers without the writers' locks see each key change
    /// alone: additions go before the removals, so a directory entry never
    /// names an object that is not there yet.
    ///
    /// A failure after the journal insert leaves the trees half-written, so
    /// it stops the process; recovery then finishes the commit. `half_way`
    /// runs in the middle of the writes (tests crash there).
    pub fn commit(&self, c: &Commit, half_way: impl FnOnce()) -> Result<(), FsError> {
        let id = self.db.generate_id().map_err(db_err)?.to_be_bytes();
        // Even a failed insert may have left the value behind, for the next
        // start to replay: from here every failure stops the process.
        let done = self.journal.insert(id, encode(c)).map(|_| ());
        if let Err(e) = done.and_then(|()| self.apply(c, half_way)).and_then(|()| self.journal.remove(id).map(|_| ())) {
            crate::volume::die(&format!("a commit failed half-way: {e}"));
        }
        Ok(())
    }

    fn apply(&self, c: &Commit, half_way: impl FnOnce()) -> sled::Result<()> {
        for (k, v) in &c.objects {
            if let Some(v) = v {
                self.objects.insert(k, v.as_slice())?;
            }
        }
        half_way();
        for (k, v) in &c.dirents {
            if let Some(v) = v {
                self.dirents.insert(k.as_slice(), v)?;
            }
        }
        for (k, v) in &c.dirents {
            if v.is_none() {
                self.dirents.remove(k.as_slice())?;
            }
        }
        for (k, v) in &c.objects {
            if v.is_none() {
                self.objects.remove(k)?;
            }
        }
        self.replies.insert(c.reply.0.as_slice(), c.reply.1.as_slice())?;
        if let Some((id, intent)) = &c.intent {
            self.intents.insert(id.to_be_bytes(), intent.as_slice())?;
        }
        if let Some(id) = c.drop_intent {
            self.intents.remove(id.to_be_bytes())?;
        }
        // Last: whoever sees the new stamp sees the change.
        self.meta.update_and_fetch(META_STAMP, |v| Some((v.map(be_u64).unwrap_or(0) + 1).to_be_bytes().to_vec()))?;
        Ok(())
    }

    /// Makes again the writes of every commit a crash cut short.
    fn replay_journal(&self) -> Result<usize, FsError> {
        let mut n = 0;
        for item in self.journal.iter() {
            let (id, bytes) = item.map_err(db_err)?;
            let c: Commit = decode(&bytes)?;
            self.apply(&c, || {}).map_err(db_err)?;
            self.journal.remove(id).map_err(db_err)?;
            n += 1;
        }
        if n > 0 {
            self.flush_now()?;
        }
        Ok(n)
    }

    pub fn meta_uuid(&self, key: &[u8]) -> Result<Uuid, FsError> {
        if let Some(v) = self.meta.get(key).map_err(db_err)? {
            return Uuid::from_slice(&v).map_err(|e| FsError::Io(e.to_string()));
        }
        let id = Uuid::new_v4();
        self.meta.insert(key, id.as_bytes().as_slice()).map_err(db_err)?;
        Ok(id)
    }

    pub fn meta_u64(&self, key: &[u8]) -> u64 {
        self.meta.get(key).ok().flatten().map(|v| be_u64(&v)).unwrap_or(0)
    }

    pub fn object(&self, fid: Fid) -> Result<Option<Object>, FsError> {
        match self.objects.get(fid_key(fid)).map_err(db_err)? {
            Some(v) => decode(&v).map(Some),
            None => Ok(None),
        }
    }

    pub fn dirent(&self, dir: Fid, name: &str) -> Result<Option<Fid>, FsError> {
        Ok(self.dirents.get(dirent_key(dir, name)).map_err(db_err)?.map(|v| Fid(be_u64(&v))))
    }

    pub fn recorded_reply(&self, client: Uuid, seq: u64) -> Option<RecordedReply> {
        let v = self.replies.get(reply_key(client, seq)).ok()??;
        decode(&v).ok()
    }

    /// Notes that a commit was made; the ticket is what `sync` waits for.
    pub fn ticket(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Makes everything committed up to `ticket` durable. Concurrent callers
    /// share one flush: whoever holds the lock flushes for all tickets issued
    /// so far, and the others find their ticket already covered.
    ///
    /// The holder flushes on its own tokio worker, blocking it for the
    /// flush. Handing the flush to another thread (`block_in_place`, or a
    /// flusher thread of its own) cost more CPU on two cores than the flush
    /// itself: 4-5 more context switches per commit. The others wait for the
    /// lock without blocking, so at most one worker waits for the disk at a
    /// time, and the runtime has at least two (see `main.rs`).
    pub async fn sync(&self, ticket: u64) -> Result<(), FsError> {
        let mut flushed = self.flushed.lock().await;
        if *flushed >= ticket {
            return Ok(());
        }
        // Every ticket issued before the flush starts is covered once it
        // returns. (`flush_async` would add a hop through sled's thread
        // pool to the one its flush already makes.)
        let target = self.written.load(Ordering::SeqCst);
        self.flush_now()?;
        *flushed = target;
        Ok(())
    }

    /// Makes everything written so far durable, outside the group commit
    /// (for rare writes that must not wait for the next commit). Blocking.
    pub fn flush_now(&self) -> Result<(), FsError> {
        self.db.flush().map_err(db_err)?;
        self.log.sync_data()?;
        Ok(())
    }
}

pub fn db_err(e: sled::Error) -> FsError {
    FsError::Io(format!("database: {e}"))
}

pub fn tx_err(e: sled::transaction::TransactionError<FsError>) -> FsError {
    match e {
        sled::transaction::TransactionError::Abort(e) => e,
        sled::transaction::TransactionError::Storage(e) => db_err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a_commit() -> Commit {
        let b = |v: &[u8]| ByteBuf::from(v.to_vec());
        Commit {
            objects: vec![(fid_key(Fid(7)), Some(b(b"new object"))), (fid_key(Fid(8)), None)],
            dirents: vec![
                (b(&dirent_key(Fid::ROOT, "new")), Some(fid_key(Fid(7)))),
                (b(&dirent_key(Fid::ROOT, "old")), None),
            ],
            reply: (b(&reply_key(Uuid::nil(), 3)), b(b"reply")),
            intent: Some((42, b(b"intent"))),
            drop_intent: None,
        }
    }

    /// A journal entry as afsd wrote it before `Commit` held `ByteBuf`s
    /// (every byte string a sequence of integers) still decodes whole.
    #[test]
    fn a_journal_entry_of_the_old_form_decodes() {
        #[derive(Serialize)]
        struct OldCommit {
            objects: Vec<([u8; 8], Option<Vec<u8>>)>,
            dirents: Vec<(Vec<u8>, Option<[u8; 8]>)>,
            reply: (Vec<u8>, Vec<u8>),
            intent: Option<(u64, Vec<u8>)>,
            drop_intent: Option<u64>,
        }
        let mut new = a_commit();
        // Bytes from 0x80 up are what the old form wrote as two bytes each.
        new.objects[0].1 = Some(ByteBuf::from(encode(&Object {
            kind: FileKind::File,
            names: vec![(Fid::ROOT, "é".into())],
            version: VersionVector::new(),
            seen: Seen { ino: 0xfedc, size: 200, ..Seen::default() },
        })));
        let old = OldCommit {
            objects: new.objects.iter().map(|(k, v)| (*k, v.as_ref().map(|v| v.to_vec()))).collect(),
            dirents: new.dirents.iter().map(|(k, v)| (k.to_vec(), *v)).collect(),
            reply: (new.reply.0.to_vec(), new.reply.1.to_vec()),
            intent: new.intent.as_ref().map(|(id, i)| (*id, i.to_vec())),
            drop_intent: Some(9),
        };
        let old_bytes = encode(&old);
        let got: Commit = decode(&old_bytes).unwrap();
        assert_eq!(got.objects, new.objects);
        assert_eq!(got.dirents, new.dirents);
        assert_eq!(got.reply, new.reply);
        assert_eq!(got.intent, new.intent);
        assert_eq!(got.drop_intent, Some(9));
        let big = Commit { intent: Some((1, ByteBuf::from(vec![0xff; 4096]))), ..Commit::default() };
        assert!(encode(&big).len() < 4200, "a byte string encodes as one binary, not 4096 integers");
    }

    fn state(db: &Db) -> (Option<sled::IVec>, Option<sled::IVec>, Option<sled::IVec>, Option<sled::IVec>, bool, bool) {
        (
            db.objects.get(fid_key(Fid(7))).unwrap(),
            db.dirents.get(dirent_key(Fid::ROOT, "new")).unwrap(),
            db.replies.get(reply_key(Uuid::nil(), 3)).unwrap(),
            db.intents.get(42u64.to_be_bytes()).unwrap(),
            db.objects.get(fid_key(Fid(8))).unwrap().is_none(),
            db.dirents.get(dirent_key(Fid::ROOT, "old")).unwrap().is_none(),
        )
    }

    /// A commit whose journal entry survived a crash, but none of whose
    /// writes did, is finished when the database is opened again.
    #[test]
    fn a_commit_cut_short_is_finished_at_the_next_open() {
        let dir = std::env::temp_dir().join(format!("afsd-db-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let db = Db::open(&dir).unwrap();
            db.objects.insert(fid_key(Fid(8)), b"doomed".to_vec()).unwrap();
            db.dirents.insert(dirent_key(Fid::ROOT, "old"), &fid_key(Fid(8))).unwrap();
            // The state a crash right after the journal insert leaves.
            db.journal.insert(1u64.to_be_bytes(), encode(&a_commit())).unwrap();
            db.flush_now().unwrap();
        }
        let db = Db::open(&dir).unwrap();
        let (obj, ent, rep, int, obj_gone, ent_gone) = state(&db);
        assert_eq!(obj.as_deref(), Some(&b"new object"[..]));
        assert_eq!(ent.as_deref(), Some(&fid_key(Fid(7))[..]));
        assert_eq!(rep.as_deref(), Some(&b"reply"[..]));
        assert_eq!(int.as_deref(), Some(&b"intent"[..]));
        assert!(obj_gone && ent_gone, "the commit's removals were made");
        assert_eq!(db.journal.len(), 0, "the journal is empty once replayed");
        assert_eq!(db.meta_u64(META_STAMP), 1, "the replayed commit moved the stamp");
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A commit makes all its writes and leaves no journal entry behind.
    #[test]
    fn a_commit_makes_every_write() {
        let dir = std::env::temp_dir().join(format!("afsd-db-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = Db::open(&dir).unwrap();
        db.commit(&a_commit(), || {}).unwrap();
        let (obj, ent, rep, int, obj_gone, ent_gone) = state(&db);
        assert!(obj.is_some() && ent.is_some() && rep.is_some() && int.is_some() && obj_gone && ent_gone);
        assert_eq!(db.journal.len(), 0);
        assert_eq!(db.meta_u64(META_STAMP), 1);
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
