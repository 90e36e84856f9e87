//! Conflicts: changes the server could not take as they were.
//!
//! Each conflict keeps both versions: the server's stays in the namespace,
//! the local one is kept in `CACHE/conflicts/<id>` until a person resolves
//! the conflict (`venus conflicts resolve`). Nothing is dropped silently.

use crate::errors::Result;
use common::{Fid, Timestamp, VersionVector};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConflictKind {
    /// Both sides changed the file.
    UpdateUpdate,
    /// Changed here, removed on the server.
    UpdateRemove,
    /// Removed here, changed on the server.
    RemoveUpdate,
    /// Both sides created the name.
    CreateCreate,
    /// The name a rename moved to was taken on the server.
    RenameCollision,
    /// The server refused the change for another reason.
    Refused,
}

impl ConflictKind {
    pub fn label(self) -> &'static str {
        match self {
            ConflictKind::UpdateUpdate => "update/update",
            ConflictKind::UpdateRemove => "update/remove",
            ConflictKind::RemoveUpdate => "remove/update",
            ConflictKind::CreateCreate => "create/create",
            ConflictKind::RenameCollision => "rename collision",
            ConflictKind::Refused => "refused",
        }
    }
}

/// One side of a conflict, as `conflicts list` shows it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Side {
    pub exists: bool,
    pub size: u64,
    pub mtime: Timestamp,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Conflict {
    pub id: u64,
    /// Path inside the mount, from its root ("/dir/file").
    pub path: String,
    pub kind: ConflictKind,
    /// The server's object at `path`, when there is one.
    pub server_fid: Option<Fid>,
    pub server_version: Option<VersionVector>,
    pub server: Side,
    pub local: Side,
    /// For rename collisions: the path the object was renamed from.
    pub renamed_from: Option<String>,
    /// What the server said.
    pub detail: String,
    pub when: i64,
}

pub struct Conflicts {
    tree: sled::Tree,
    pub dir: PathBuf,
}

impl Conflicts {
    pub fn open(db: &sled::Db, cache_dir: &std::path::Path) -> Result<Conflicts> {
        let dir = cache_dir.join("conflicts");
        std::fs::create_dir_all(&dir)?;
        Ok(Conflicts { tree: db.open_tree("conflicts")?, dir })
    }

    fn next_id(&self) -> u64 {
        let last =
            self.tree.last().ok().flatten().map(|(k, _)| u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])));
        last.unwrap_or(0) + 1
    }

    /// Where the local version of conflict `id` is kept.
    pub fn local_copy(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.local"))
    }

    /// Records a conflict, copying the local content (if any) out of the
    /// cache first, fsynced, so it survives whatever happens next.
    pub fn add(&self, mut c: Conflict, local_content: Option<&File>) -> Result<u64> {
        let id = self.next_id();
        c.id = id;
        if let Some(src) = local_content {
            c.local.exists = true;
            c.local.size = copy_synced(src, &self.local_copy(id))?;
        }
        self.tree.insert(id.to_be_bytes(), rmp_serde::to_vec_named(&c).expect("conflicts encode"))?;
        self.tree.flush()?;
        tracing::warn!(path = %c.path, kind = c.kind.label(), detail = %c.detail, "conflict recorded; both versions kept");
        Ok(id)
    }

    /// Replaces conflict `id`'s local copy with `src` (written after the
    /// conflict was recorded, through a descriptor still open): a new file
    /// beside it, fsynced, then renamed over it.
    pub fn replace_local(&self, id: u64, src: &File) -> Result<()> {
        let path = self.local_copy(id);
        let tmp = path.with_extension("local.new");
        let size = copy_synced(src, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        if let Some(v) = self.tree.get(id.to_be_bytes())? {
            if let Ok(mut c) = rmp_serde::from_slice::<Conflict>(&v) {
                c.local.size = size;
                self.tree.insert(id.to_be_bytes(), rmp_serde::to_vec_named(&c).expect("conflicts encode"))?;
                self.tree.flush()?;
            }
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<Conflict> {
        self.tree.iter().flatten().filter_map(|(_, v)| rmp_serde::from_slice(&v).ok()).collect()
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn find(&self, path: &str) -> Option<Conflict> {
        self.list().into_iter().find(|c| c.path == path)
    }

    /// Forgets a resolved conflict and its local copy.
    pub fn remove(&self, id: u64) -> Result<()> {
        self.tree.remove(id.to_be_bytes())?;
        self.tree.flush()?;
        let _ = std::fs::remove_file(self.local_copy(id));
        Ok(())
    }
}

/// Copies all of `src` into a new file at `to`, fsynced; returns its size.
fn copy_synced(src: &File, to: &std::path::Path) -> Result<u64> {
    let mut out = File::create(to)?;
    let mut src = src;
    std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0))?;
    std::io::copy(&mut src, &mut out)?;
    out.sync_all()?;
    Ok(out.metadata()?.len())
}
