//! Open transfers: fetches being read in chunks and stores being staged.
//!
//! A fetch handle holds the file descriptor opened at fetch time, so every
//! chunk comes from the same version even if a store replaces the file
//! meanwhile (a store renames a new inode into place). A stage handle owns a
//! temporary file in the staging area until a store consumes it. Handles idle
//! for too long are dropped (and their staging files deleted), so a client
//! that vanishes mid-transfer costs nothing for long.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// Open handles one client may hold: bounds descriptors and staging space.
pub const MAX_PER_CLIENT: usize = 256;

pub enum Kind {
    Read,
    /// The staging file's name in the staging directory.
    Stage(String),
}

pub struct Handle {
    pub client: Uuid,
    pub file: Arc<File>,
    pub kind: Kind,
    last_used: Instant,
}

pub struct Handles {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Handle>>,
    staging_dir: PathBuf,
}

impl Handles {
    pub fn new(staging_dir: PathBuf) -> Handles {
        Handles { next: AtomicU64::new(1), map: Mutex::new(HashMap::new()), staging_dir }
    }

    pub fn insert(&self, client: Uuid, file: File, kind: Kind) -> Option<u64> {
        let mut map = self.map.lock().unwrap();
        if map.values().filter(|h| h.client == client).count() >= MAX_PER_CLIENT {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(id, Handle { client, file: Arc::new(file), kind, last_used: Instant::now() });
        Some(id)
    }

    /// The file behind a handle, if it exists and belongs to `client`.
    pub fn get(&self, client: Uuid, id: u64, stage: bool) -> Option<Arc<File>> {
        let mut map = self.map.lock().unwrap();
        let h = map.get_mut(&id)?;
        if h.client != client || matches!(h.kind, Kind::Stage(_)) != stage {
            return None;
        }
        h.last_used = Instant::now();
        Some(h.file.clone())
    }

    /// The file of a fetch handle owned by `client`.
    pub fn reader(&self, client: Uuid, id: u64) -> Option<Arc<File>> {
        let mut map = self.map.lock().unwrap();
        let h = map.get_mut(&id).filter(|h| h.client == client && matches!(h.kind, Kind::Read))?;
        h.last_used = Instant::now();
        Some(h.file.clone())
    }

    /// Removes a handle. For a staged file the caller takes over its name.
    pub fn take(&self, client: Uuid, id: u64) -> Option<Handle> {
        let mut map = self.map.lock().unwrap();
        if map.get(&id)?.client != client {
            return None;
        }
        map.remove(&id)
    }

    /// Drops a handle, deleting its staging file if it has one.
    pub fn release(&self, client: Uuid, id: u64) {
        if let Some(h) = self.take(client, id) {
            self.discard(h);
        }
    }

    pub fn discard(&self, h: Handle) {
        if let Kind::Stage(name) = h.kind {
            let _ = std::fs::remove_file(self.staging_dir.join(name));
        }
    }

    /// Whether a fetch is still reading the inode `ino`: its content must
    /// then change by rename, never in place.
    pub fn reading(&self, ino: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        let map = self.map.lock().unwrap();
        map.values().any(|h| matches!(h.kind, Kind::Read) && h.file.metadata().map(|m| m.ino() == ino).unwrap_or(true))
    }

    pub fn reap_idle(&self) {
        let expired: Vec<Handle> = {
            let mut map = self.map.lock().unwrap();
            let old: Vec<u64> =
                map.iter().filter(|(_, h)| h.last_used.elapsed() > IDLE_LIMIT).map(|(k, _)| *k).collect();
            old.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        for h in expired {
            self.discard(h);
        }
    }
}
