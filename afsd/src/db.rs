//! The server's sled database: trees, key layouts, versioned records, and
//! group commit.
//!
//! Values are stored wrapped in a version enum (`Stored::V1`) so the on-disk
//! format can evolve separately from the wire format.

use common::proto::Reply;
use common::{Fid, FileKind, FsError, Timestamp, VersionVector};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
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
            db,
            written: AtomicU64::new(0),
            flushed: tokio::sync::Mutex::new(0),
            log,
        })
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

    /// Notes that a transaction committed; the ticket is what `sync` waits for.
    pub fn ticket(&self) -> u64 {
        self.written.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Makes everything committed up to `ticket` durable. Concurrent callers
    /// share one flush: whoever holds the lock flushes for all tickets issued
    /// so far, and the others find their ticket already covered.
    pub async fn sync(&self, ticket: u64) -> Result<(), FsError> {
        let mut flushed = self.flushed.lock().await;
        if *flushed >= ticket {
            return Ok(());
        }
        let target = self.written.load(Ordering::SeqCst);
        // One blocking section for both: `flush_async` would add a hop
        // through sled's thread pool to the one its flush already makes.
        tokio::task::block_in_place(|| self.flush_now())?;
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
