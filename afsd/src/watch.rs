//! Noticing edits made directly in the exported directory.
//!
//! An inotify watch of the export (`inotify.rs`) reports paths; each is
//! mapped back to the deepest object the server knows, and that object and
//! its directory are checked against what the server last recorded. A
//! difference gives the object a new version and breaks its callbacks,
//! within about a second of the edit. Events caused by the server's own
//! changes find nothing new.

use crate::inotify::{self, Change};
use crate::volume::Volume;
use common::Fid;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Events are gathered this long before being looked at, so a burst of
/// writes costs one check.
const DEBOUNCE: Duration = Duration::from_millis(100);

pub fn start(vol: Arc<Volume>) -> std::io::Result<inotify::Watch> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let skip = vol.staging_in_export.as_ref().map(PathBuf::from);
    let watch = inotify::watch(vol.export.path(), skip, move |change| match change {
        Change::Path(p) => {
            let _ = tx.send(p);
        }
        Change::Overflow => tracing::warn!(
            "too many changes in the export at once: edits made behind the server's back meanwhile are \
             noticed when their objects are next used"
        ),
    })?;
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut paths = BTreeSet::from([first]);
            tokio::time::sleep(DEBOUNCE).await;
            while let Ok(p) = rx.try_recv() {
                paths.insert(p);
            }
            let mut fids = BTreeSet::new();
            for p in paths {
                for fid in known_objects(&vol, &p) {
                    fids.insert(fid);
                }
            }
            for fid in fids {
                // A tree removed outside reports thousands of objects: the
                // runtime may stop this between two of them.
                tokio::task::yield_now().await;
                let Ok(obj) = vol.object(fid) else { continue };
                let Ok(st) = vol.stat_at_once(fid) else { continue };
                if let Err(e) = vol.notice_external(fid, obj, &st, false).await {
                    tracing::debug!(%fid, "checking an outside edit failed: {e}");
                }
            }
        }
    });
    Ok(watch)
}

/// The deepest known object on the path, and its directory.
fn known_objects(vol: &Volume, path: &std::path::Path) -> Vec<Fid> {
    let Ok(rel) = path.strip_prefix(vol.export.path()) else { return vec![] };
    let mut chain = vec![Fid::ROOT];
    for comp in rel.components() {
        let Some(name) = comp.as_os_str().to_str() else { break };
        if chain.len() == 1 && vol.staging_in_export.as_deref() == Some(name) {
            return vec![];
        }
        match vol.db.dirent(*chain.last().expect("chain starts with root"), name) {
            Ok(Some(fid)) => chain.push(fid),
            _ => break,
        }
    }
    chain.into_iter().rev().take(2).collect()
}
