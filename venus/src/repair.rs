//! Showing and resolving conflicts (`venus conflicts show|resolve`).
//!
//! Resolution needs the server: it writes the chosen content (or name) there
//! through the ordinary protocol, so every other client sees the outcome
//! through the usual callback breaks.

use crate::conflicts::{Conflict, ConflictKind};
use crate::errors::{errno, Result};
use crate::fs::Venus;
use common::proto::*;
use common::rpc::{fetch_to_file, store_from_file};
use common::{Attr, Fid, FileKind, FsError};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;

fn is_not_found(e: &crate::errors::VenusError) -> bool {
    use crate::errors::VenusError;
    matches!(e, VenusError::Fs(FsError::NotFound) | VenusError::Rpc(common::rpc::RpcError::Fs(FsError::NotFound)))
}

/// What to keep.
pub enum Resolution {
    Local,
    Server,
    Both,
    Use(std::path::PathBuf),
}

impl Venus {
    /// A path given to the CLI (absolute, inside the mount) as a volume path.
    pub fn volume_path(&self, path: &str) -> Result<String> {
        let p = Path::new(path);
        let rel = p.strip_prefix(&self.mountpoint).map_err(|_| {
            errno(libc::EINVAL, format!("{path} is not inside the mount {}", self.mountpoint.display()))
        })?;
        let mut out = String::new();
        for c in rel.components() {
            match c {
                std::path::Component::Normal(n) => {
                    out.push('/');
                    out.push_str(n.to_str().ok_or_else(|| errno(libc::EINVAL, "paths must be UTF-8"))?);
                }
                std::path::Component::CurDir => {}
                _ => return Err(errno(libc::EINVAL, format!("{path}: use a plain path inside the mount"))),
            }
        }
        Ok(if out.is_empty() { "/".into() } else { out })
    }

    fn conflict_at(&self, path: &str) -> Result<Conflict> {
        let vpath = self.volume_path(path)?;
        self.conflicts.find(&vpath).ok_or_else(|| errno(libc::ENOENT, format!("no conflict at {vpath}")))
    }

    /// Walks a volume path on the server: the parent directory's fid and the
    /// object at the path, if any.
    async fn server_path(&self, vpath: &str) -> Result<(Fid, String, Option<Attr>)> {
        self.walk_server_path(vpath, false).await
    }

    /// Like `server_path`, making missing directories on the way if
    /// `make_dirs`; a file where a directory should be is an error that says so.
    async fn walk_server_path(&self, vpath: &str, make_dirs: bool) -> Result<(Fid, String, Option<Attr>)> {
        let mut names: Vec<&str> = vpath.split('/').filter(|s| !s.is_empty()).collect();
        let last = names.pop().ok_or_else(|| errno(libc::EINVAL, "the root cannot be in conflict"))?.to_string();
        let mut dir = Fid::ROOT;
        let mut walked = String::new();
        for n in names {
            walked.push('/');
            walked.push_str(n);
            let attr = match self.remote(self.client.lookup(LookupReq { dir, name: n.to_string() })).await {
                Ok(e) => e.attr,
                Err(e) if make_dirs && is_not_found(&e) => {
                    tracing::info!(path = %walked, "making a directory the conflict's path needs");
                    let made = self.remote(self.client.mkdir(MkdirReq { dir, name: n.to_string(), mode: 0o755 })).await;
                    match made {
                        Ok(e) => e.attr,
                        // Made meanwhile by someone else: use theirs.
                        Err(_) => self.remote(self.client.lookup(LookupReq { dir, name: n.to_string() })).await?.attr,
                    }
                }
                Err(e) => return Err(e),
            };
            if attr.kind != FileKind::Dir {
                return Err(errno(
                    libc::ENOTDIR,
                    format!("{walked} is not a directory on the server: use --keep server, or --use a copy elsewhere"),
                ));
            }
            dir = attr.fid;
        }
        let obj = match self.remote(self.client.lookup(LookupReq { dir, name: last.clone() })).await {
            Ok(e) => Some(e.attr),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(e),
        };
        Ok((dir, last, obj))
    }

    pub async fn conflict_show(&self, path: &str) -> Result<Value> {
        let c = self.conflict_at(path)?;
        let local = std::fs::read(self.conflicts.local_copy(c.id)).ok();
        let server = if self.link.is_connected() {
            match self.server_path(&c.path).await {
                Ok((_, _, Some(a))) if a.kind == FileKind::File => {
                    let tmp = self.cache.temp_path(a.fid);
                    let f = Arc::new(
                        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&tmp)?,
                    );
                    let got = self.remote(fetch_to_file(&self.client, a.fid, f)).await;
                    let data = std::fs::read(&tmp).ok();
                    let _ = std::fs::remove_file(&tmp);
                    got.ok().and(data)
                }
                _ => None,
            }
        } else {
            None
        };
        let text =
            |d: &Option<Vec<u8>>| d.as_ref().map(|b| !b.contains(&0) && std::str::from_utf8(b).is_ok()).unwrap_or(true);
        let describe = |d: &Option<Vec<u8>>| match d {
            Some(b) => json!({ "size": b.len(), "sha256": format!("{:x}", Sha256::digest(b)) }),
            None => Value::Null,
        };
        let diff = if (local.is_some() || server.is_some()) && text(&local) && text(&server) {
            let l = local.as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let s = server.as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            Some(
                similar::TextDiff::from_lines(&s, &l)
                    .unified_diff()
                    .header(&format!("server{}", c.path), &format!("local{}", c.path))
                    .to_string(),
            )
        } else {
            None
        };
        Ok(json!({
            "path": c.path,
            "kind": c.kind.label(),
            "detail": c.detail,
            "renamed_from": c.renamed_from,
            "local": describe(&local),
            "server": describe(&server),
            "diff": diff,
        }))
    }

    pub async fn conflict_resolve(&self, path: &str, how: Resolution) -> Result<String> {
        if !self.link.is_connected() {
            return Err(errno(libc::ENOTCONN, "resolving a conflict needs the server: reconnect first"));
        }
        let c = self.conflict_at(path)?;
        let local = self.conflicts.local_copy(c.id);
        let has_local = local.exists();
        // Keeping local content where its directory was removed on the
        // server recreates the directories; keeping the server's side
        // needs nothing made.
        let keep_server = matches!(how, Resolution::Server);
        let (dir, name, server) = match self.walk_server_path(&c.path, !keep_server).await {
            Ok(found) => found,
            Err(_) if keep_server => {
                // Not even the directory is there any more: keeping the
                // server's side means keeping nothing.
                self.conflicts.remove(c.id)?;
                tracing::info!(path = %c.path, "conflict resolved: kept the server's side (the path is gone there)");
                return Ok("kept the server's side (the path no longer exists there)".into());
            }
            Err(e) => return Err(e),
        };
        let outcome = match how {
            Resolution::Server => "kept the server's version".to_string(),
            Resolution::Use(file) => {
                self.put_content(dir, &name, server.as_ref(), &file).await?;
                format!("stored {} at {}", file.display(), c.path)
            }
            Resolution::Local => match c.kind {
                ConflictKind::RemoveUpdate => {
                    if server.is_some() {
                        let req = RemoveReq { dir, name: name.clone(), base: None };
                        let r = if server.as_ref().is_some_and(|a| a.kind == FileKind::Dir) {
                            self.remote(self.client.rmdir(RmdirReq { dir, name: name.clone() })).await
                        } else {
                            self.remote(self.client.remove(req)).await
                        };
                        r?;
                    }
                    "removed the server's version, as it was locally".into()
                }
                ConflictKind::RenameCollision => {
                    let from = c.renamed_from.clone().ok_or_else(|| errno(libc::EIO, "rename source unknown"))?;
                    let (fdir, fname, _) = self.server_path(&from).await?;
                    self.remote(self.client.rename(RenameReq {
                        from_dir: fdir,
                        from_name: fname,
                        to_dir: dir,
                        to_name: name.clone(),
                        no_replace: false,
                        replaced_base: None,
                    }))
                    .await?;
                    format!("renamed {from} over {}", c.path)
                }
                _ if has_local => {
                    self.put_content(dir, &name, server.as_ref(), &local).await?;
                    "kept the local version".into()
                }
                _ => return Err(errno(libc::EINVAL, "there is no local content to keep; use --keep server")),
            },
            Resolution::Both => match c.kind {
                ConflictKind::RenameCollision => {
                    let from = c.renamed_from.clone().ok_or_else(|| errno(libc::EIO, "rename source unknown"))?;
                    let (fdir, fname, _) = self.server_path(&from).await?;
                    let beside = self.free_name(dir, &name).await?;
                    self.remote(self.client.rename(RenameReq {
                        from_dir: fdir,
                        from_name: fname,
                        to_dir: dir,
                        to_name: beside.clone(),
                        no_replace: true,
                        replaced_base: None,
                    }))
                    .await?;
                    format!("kept both: the local one is {beside}")
                }
                _ if has_local => {
                    let beside = self.free_name(dir, &name).await?;
                    self.put_content(dir, &beside, None, &local).await?;
                    format!("kept both: the local version is {beside}")
                }
                _ => "nothing local to keep beside the server's version".into(),
            },
        };
        self.conflicts.remove(c.id)?;
        // Our own view of the directory and object must reflect the result,
        // and so must the kernel's memory of the name.
        let mut stale = vec![dir];
        if let Some(a) = server {
            stale.push(a.fid);
        }
        tokio::task::block_in_place(|| {
            self.on_break(&stale);
            self.invalidate_kernel_entry(dir, &name);
        });
        tracing::info!(path = %c.path, "conflict resolved: {outcome}");
        Ok(outcome)
    }

    /// `NAME.local-<client>`: a name beside the original that says where the
    /// copy came from (with a counter if that is taken too).
    async fn free_name(&self, dir: Fid, name: &str) -> Result<String> {
        let who = self.client.id().simple().to_string();
        let base = format!("{name}.local-{}", &who[..8]);
        for i in 0..100 {
            let candidate = if i == 0 { base.clone() } else { format!("{base}-{i}") };
            match self.remote(self.client.lookup(LookupReq { dir, name: candidate.clone() })).await {
                Err(e) if is_not_found(&e) => return Ok(candidate),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(errno(libc::EEXIST, "no free name beside the conflict"))
    }

    /// Makes `dir/name` hold the content of `src` on the server.
    async fn put_content(&self, dir: Fid, name: &str, existing: Option<&Attr>, src: &Path) -> Result<()> {
        let attr = match existing {
            Some(a) if a.kind == FileKind::File => {
                // The freshest version, so the store is not itself a conflict.
                self.remote(self.client.getattr(GetAttrReq { fid: a.fid })).await?.attr
            }
            Some(_) => return Err(errno(libc::EISDIR, "the server has a directory there")),
            None => {
                self.remote(self.client.create(CreateReq {
                    dir,
                    name: name.to_string(),
                    mode: 0o644,
                    exclusive: false,
                    content: None,
                }))
                .await?
                .attr
            }
        };
        let file = Arc::new(std::fs::File::open(src)?);
        self.remote(store_from_file(&self.client, attr.fid, attr.version, file, None, None)).await?;
        Ok(())
    }
}
