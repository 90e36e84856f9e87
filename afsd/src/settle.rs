//! Deferred fsyncs of the export, many changes at a time.
//!
//! A mutation is durable once its commit, which carries its intent, is
//! flushed: from then on a crash is repaired by redoing the intent. So the
//! export's own fsync need not delay the reply. For creates and in-place
//! fills (the changes every new file goes through; a create with content
//! is a fill that makes the file) `Volume::execute`
//! applies the intent, answers, and hands the descriptors (the file, and a
//! new one's directory) to be synced here
//! instead: one fsync per distinct directory or file every few
//! milliseconds, after which the intents are dropped. Until that, an intent
//! left by a crash is redone from what the database says at the next start
//! (`Volume::redo`), so the outcome is the same whenever the crash happens.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;
use std::time::Duration;

/// How long the settler gathers changes before syncing them.
pub const GATHER: Duration = Duration::from_millis(20);
/// Deferred changes beyond which the next one is settled at once (bounds
/// the descriptors held).
pub const MAX_PENDING: usize = 1024;

/// Applied changes waiting for an fsync: (intent id, what to sync).
#[derive(Default)]
pub struct Settler {
    pending: Mutex<Vec<(u64, Vec<File>)>>,
    pub wake: tokio::sync::Notify,
}

impl Settler {
    /// Queues the fsyncs that complete intent `id`; returns how many wait.
    pub fn defer(&self, id: u64, fds: Vec<File>) -> usize {
        let mut p = self.pending.lock().unwrap();
        p.push((id, fds));
        let n = p.len();
        drop(p);
        self.wake.notify_one();
        n
    }

    /// Syncs everything queued so far; returns the ids now safe to drop.
    /// A failed fsync leaves the export's state unknown (Linux may have
    /// dropped the dirty pages), so it is an error the caller must not
    /// paper over: recovery redoes the intents from the database.
    pub fn settle(&self) -> std::io::Result<Vec<u64>> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap());
        let mut synced = std::collections::HashSet::new();
        for fd in batch.iter().flat_map(|(_, fds)| fds) {
            let key = fd.metadata().map(|m| (m.dev(), m.ino()))?;
            if synced.insert(key) {
                fd.sync_all()?;
            }
        }
        Ok(batch.into_iter().map(|(id, _)| id).collect())
    }
}
