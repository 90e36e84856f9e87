//! The client modification log: every change made while disconnected, in
//! order, persisted in sled before the operation returns.
//!
//! The log is optimised as it grows, so reintegration sends the net effect:
//! a file stored ten times is stored once (with the base version of the
//! first store), a create followed by a remove leaves nothing, setattrs of
//! mode and times fold into a following store, and a chain of renames of one
//! object keeps only its final effect.

use crate::errors::Result;
use common::{Fid, SetAttr, VersionVector};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// One logged change. Fids may be local (objects created offline).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CmlOp {
    /// The container's content at reintegration time is sent.
    Store {
        fid: Fid,
        base: VersionVector,
        mode: Option<u32>,
    },
    Create {
        dir: Fid,
        name: String,
        fid: Fid,
        mode: u32,
    },
    Mkdir {
        dir: Fid,
        name: String,
        fid: Fid,
        mode: u32,
    },
    Symlink {
        dir: Fid,
        name: String,
        fid: Fid,
        target: String,
    },
    Link {
        fid: Fid,
        dir: Fid,
        name: String,
    },
    Remove {
        dir: Fid,
        name: String,
        fid: Fid,
        base: Option<VersionVector>,
    },
    Rmdir {
        dir: Fid,
        name: String,
        fid: Fid,
    },
    /// `replaced`: the object the rename replaced locally, if any, and the
    /// version of it that was replaced (so a replacement of something
    /// changed on the server meanwhile becomes a conflict, not a loss).
    Rename {
        from_dir: Fid,
        from: String,
        to_dir: Fid,
        to: String,
        fid: Fid,
        replaced: Option<Fid>,
        #[serde(default)]
        replaced_base: Option<VersionVector>,
    },
    SetAttr {
        fid: Fid,
        set: SetAttr,
        base: Option<VersionVector>,
    },
}

impl CmlOp {
    /// The object this record is about.
    pub fn subject(&self) -> Fid {
        match self {
            CmlOp::Store { fid, .. }
            | CmlOp::Create { fid, .. }
            | CmlOp::Mkdir { fid, .. }
            | CmlOp::Symlink { fid, .. }
            | CmlOp::Link { fid, .. }
            | CmlOp::Remove { fid, .. }
            | CmlOp::Rmdir { fid, .. }
            | CmlOp::Rename { fid, .. }
            | CmlOp::SetAttr { fid, .. } => *fid,
        }
    }

    /// Every fid the record names.
    pub fn fids(&self) -> Vec<Fid> {
        match self {
            CmlOp::Store { fid, .. } | CmlOp::SetAttr { fid, .. } => vec![*fid],
            CmlOp::Create { dir, fid, .. }
            | CmlOp::Mkdir { dir, fid, .. }
            | CmlOp::Symlink { dir, fid, .. }
            | CmlOp::Link { fid, dir, .. }
            | CmlOp::Remove { dir, fid, .. }
            | CmlOp::Rmdir { dir, fid, .. } => vec![*dir, *fid],
            CmlOp::Rename { from_dir, to_dir, fid, replaced, .. } => {
                let mut v = vec![*from_dir, *to_dir, *fid];
                v.extend(replaced);
                v
            }
        }
    }

    pub fn map_fids(&mut self, f: &impl Fn(Fid) -> Fid) {
        match self {
            CmlOp::Store { fid, .. } | CmlOp::SetAttr { fid, .. } => *fid = f(*fid),
            CmlOp::Create { dir, fid, .. }
            | CmlOp::Mkdir { dir, fid, .. }
            | CmlOp::Symlink { dir, fid, .. }
            | CmlOp::Link { fid, dir, .. }
            | CmlOp::Remove { dir, fid, .. }
            | CmlOp::Rmdir { dir, fid, .. } => {
                *dir = f(*dir);
                *fid = f(*fid);
            }
            CmlOp::Rename { from_dir, to_dir, fid, replaced, .. } => {
                *from_dir = f(*from_dir);
                *to_dir = f(*to_dir);
                *fid = f(*fid);
                *replaced = replaced.map(f);
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            CmlOp::Store { .. } => "store",
            CmlOp::Create { .. } => "create",
            CmlOp::Mkdir { .. } => "mkdir",
            CmlOp::Symlink { .. } => "symlink",
            CmlOp::Link { .. } => "link",
            CmlOp::Remove { .. } => "remove",
            CmlOp::Rmdir { .. } => "rmdir",
            CmlOp::Rename { .. } => "rename",
            CmlOp::SetAttr { .. } => "setattr",
        }
    }
}

/// A logged change and the transaction id it is (or will be) sent under.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub op: CmlOp,
    /// Set once the record was (maybe) sent: resending reuses it, so the
    /// server runs the change at most once.
    pub seq: Option<u64>,
}

pub struct Cml {
    tree: sled::Tree,
    /// The log in memory, in order; sled holds the same.
    records: Mutex<Vec<Record>>,
}

fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

impl Cml {
    pub fn open(db: &sled::Db) -> Result<Cml> {
        let tree = db.open_tree("cml")?;
        let mut records = Vec::new();
        for item in tree.iter() {
            let (_, v) = item?;
            match rmp_serde::from_slice::<Record>(&v) {
                Ok(r) => records.push(r),
                Err(e) => {
                    return Err(crate::errors::errno(
                        libc::EIO,
                        format!("unreadable log record (refusing to drop it): {e}"),
                    ))
                }
            }
        }
        Ok(Cml { tree, records: Mutex::new(records) })
    }

    pub fn len(&self) -> usize {
        self.records.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn records(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }

    /// Up to `n` records from position `skip`, in order.
    pub fn records_from(&self, skip: usize, n: usize) -> Vec<Record> {
        self.records.lock().unwrap().iter().skip(skip).take(n).cloned().collect()
    }

    /// Whether the record is still in the log (ids ascend with position).
    pub fn contains(&self, id: u64) -> bool {
        self.records.lock().unwrap().binary_search_by_key(&id, |r| r.id).is_ok()
    }

    /// Whether some record matches, without copying the log.
    pub fn any(&self, f: impl Fn(&Record) -> bool) -> bool {
        self.records.lock().unwrap().iter().any(f)
    }

    fn next_id(records: &[Record]) -> u64 {
        records.last().map(|r| r.id + 1).unwrap_or(1)
    }

    fn put(&self, r: &Record) -> Result<()> {
        self.tree.insert(key(r.id), rmp_serde::to_vec_named(r).expect("records encode"))?;
        Ok(())
    }

    fn delete(&self, id: u64) -> Result<()> {
        self.tree.remove(key(id))?;
        Ok(())
    }

    /// `append_mapped` with the fids as they are (tests).
    #[cfg(test)]
    pub fn append(&self, op: CmlOp, seq: Option<u64>) -> Result<()> {
        self.append_mapped(op, seq, &|f| f)
    }

    /// Appends a change, optimising the log. `seq` is the transaction id of
    /// a connected attempt that failed (the server may have run it).
    ///
    /// `current` gives each fid's current name (a local fid's server fid
    /// once it has one), asked under the log's lock: a change decided just
    /// before reintegration renumbered its object would otherwise be logged
    /// under the old local fid after `remap` rewrote every other record,
    /// and its store would find no container under that name. The
    /// renumbering records the alias before it remaps the log, so a change
    /// appended before the remap is rewritten by it, and one appended after
    /// it sees the alias here.
    pub fn append_mapped(&self, op: CmlOp, seq: Option<u64>, current: &dyn Fn(Fid) -> Fid) -> Result<()> {
        let mut recs = self.records.lock().unwrap();
        // Only records not yet sent may be rewritten or dropped: a sent one
        // may have run on the server.
        let unsent = |r: &Record| r.seq.is_none();
        let mut op = op;
        op.map_fids(&current);
        match &mut op {
            CmlOp::Store { fid, base, mode } if seq.is_none() => {
                // Repeated stores: keep one, with the first store's base.
                if let Some(i) =
                    recs.iter().position(|r| unsent(r) && matches!(&r.op, CmlOp::Store { fid: f, .. } if f == fid))
                {
                    if let CmlOp::Store { base: b, mode: m, .. } = &recs[i].op {
                        *base = b.clone();
                        if mode.is_none() {
                            *mode = *m;
                        }
                    }
                    let id = recs.remove(i).id;
                    self.delete(id)?;
                }
                // Setattrs of mode and times fold into the store.
                let mut i = 0;
                while i < recs.len() {
                    if let (true, CmlOp::SetAttr { fid: f, set, .. }) = (unsent(&recs[i]), &recs[i].op) {
                        if f == fid && set.uid.is_none() && set.gid.is_none() {
                            if let Some(m) = set.mode {
                                // In log order: the last chmod wins.
                                *mode = Some(m);
                            }
                            let id = recs.remove(i).id;
                            self.delete(id)?;
                            continue;
                        }
                    }
                    i += 1;
                }
            }
            CmlOp::SetAttr { fid, set, .. } if seq.is_none() => {
                // Consecutive setattrs of one object merge.
                if let Some(last) = recs.last_mut().filter(|r| unsent(r)) {
                    if let CmlOp::SetAttr { fid: f, set: s, .. } = &mut last.op {
                        if f == fid {
                            merge_setattr(s, set);
                            let r = last.clone();
                            return self.put(&r);
                        }
                    }
                }
            }
            CmlOp::Rename { from_dir, from, to_dir, to, fid, replaced, .. } if seq.is_none() && replaced.is_none() => {
                // A rename chain keeps its final effect, but only when the
                // previous step is the last record: folding across other
                // changes would move this step before them (a swap through a
                // temporary name, a move into a directory made in between).
                if let Some(prev) = recs.last_mut().filter(|r| unsent(r)) {
                    if let CmlOp::Rename {
                        to_dir: pd, to: pn, replaced: None, from_dir: fd0, from: fn0, fid: pf, ..
                    } = &mut prev.op
                    {
                        if pf == fid && pd == from_dir && pn == from {
                            *pd = *to_dir;
                            *pn = to.clone();
                            if fd0 == pd && fn0 == pn {
                                let id = prev.id;
                                recs.pop();
                                return self.delete(id);
                            }
                            let r = prev.clone();
                            return self.put(&r);
                        }
                    }
                }
            }
            CmlOp::Remove { fid, .. } | CmlOp::Rmdir { fid, .. } if fid.is_local() && seq.is_none() => {
                // Created offline and gone again: nothing of it needs sending,
                // as long as none of its records went out already.
                let target = *fid;
                let touching: Vec<usize> =
                    recs.iter().enumerate().filter(|(_, r)| r.op.fids().contains(&target)).map(|(i, _)| i).collect();
                // Only when every record is about the object itself (not
                // something inside it, if a directory) and it never got a
                // second name: a hard link keeps it alive.
                let only_itself = touching
                    .iter()
                    .all(|&i| recs[i].op.subject() == target && !matches!(recs[i].op, CmlOp::Link { .. }));
                if only_itself && touching.iter().all(|&i| unsent(&recs[i])) {
                    // A rename of it that replaced another object still has
                    // to remove that object: the removal takes the rename's
                    // place (and id) in the log.
                    for &i in touching.iter().rev() {
                        let r = recs.remove(i);
                        self.delete(r.id)?;
                        if let CmlOp::Rename { to_dir, to, replaced: Some(old), replaced_base, .. } = r.op {
                            // With the version it replaced: a change made on
                            // the server meanwhile becomes a conflict.
                            let rec = Record {
                                id: r.id,
                                op: CmlOp::Remove { dir: to_dir, name: to, fid: old, base: replaced_base },
                                seq: None,
                            };
                            self.put(&rec)?;
                            recs.insert(i, rec);
                        }
                    }
                    return Ok(());
                }
            }
            _ => {}
        }
        let rec = Record { id: Self::next_id(&recs), op, seq };
        self.put(&rec)?;
        recs.push(rec);
        Ok(())
    }

    /// An existing object lost its last name offline: its content is gone
    /// with it, so its unsent stores and setattrs go too. (Their base is the
    /// version the removal is checked against, so a removal of a file
    /// changed on the server meanwhile still becomes a conflict.)
    pub fn drop_unsent_changes(&self, fid: Fid) -> Result<()> {
        let mut recs = self.records.lock().unwrap();
        let mut i = 0;
        while i < recs.len() {
            if recs[i].seq.is_none()
                && recs[i].op.subject() == fid
                && matches!(recs[i].op, CmlOp::Store { .. } | CmlOp::SetAttr { .. })
            {
                let id = recs.remove(i).id;
                self.delete(id)?;
                continue;
            }
            i += 1;
        }
        Ok(())
    }

    /// Claims a record for sending: its transaction id, assigned (from
    /// `allocate`) and persisted now if it has none. From here on the record
    /// is never rewritten or folded away. None if it is gone already (folded
    /// into a later record while its request was being built).
    pub fn claim(&self, id: u64, allocate: impl FnOnce() -> u64) -> Result<Option<Record>> {
        let mut recs = self.records.lock().unwrap();
        let Some(r) = recs.iter_mut().find(|r| r.id == id) else { return Ok(None) };
        if r.seq.is_none() {
            r.seq = Some(allocate());
            let r = r.clone();
            self.put(&r)?;
        }
        Ok(Some(r.clone()))
    }

    /// Forgets the transaction id of a record that ran on the server
    /// without effect, so it is sent again as a new request.
    pub fn clear_seq(&self, id: u64) -> Result<()> {
        let mut recs = self.records.lock().unwrap();
        if let Some(r) = recs.iter_mut().find(|r| r.id == id) {
            r.seq = None;
            let r = r.clone();
            self.put(&r)?;
        }
        Ok(())
    }

    /// Rewrites fids in every record (a local fid got its server fid).
    pub fn remap(&self, from: Fid, to: Fid) -> Result<()> {
        self.remap_all(&std::collections::HashMap::from([(from, to)]))
    }

    /// Rewrites every local fid that has a server fid in `map`.
    pub fn remap_all(&self, map: &std::collections::HashMap<Fid, Fid>) -> Result<()> {
        let mut recs = self.records.lock().unwrap();
        for r in recs.iter_mut() {
            if r.op.fids().iter().any(|f| map.contains_key(f)) {
                r.op.map_fids(&|f| map.get(&f).copied().unwrap_or(f));
                let r = r.clone();
                self.put(&r)?;
            }
        }
        Ok(())
    }

    /// Later records of `fid` based on `before` get `after` as their base.
    pub fn rebase(&self, fid: Fid, before: &VersionVector, after: &VersionVector) -> Result<()> {
        let mut recs = self.records.lock().unwrap();
        for r in recs.iter_mut() {
            let base = match &mut r.op {
                CmlOp::Store { fid: f, base, .. } if *f == fid => Some(base),
                CmlOp::SetAttr { fid: f, base: Some(base), .. } if *f == fid => Some(base),
                CmlOp::Remove { fid: f, base: Some(base), .. } if *f == fid => Some(base),
                CmlOp::Rename { replaced: Some(f), replaced_base: Some(base), .. } if *f == fid => Some(base),
                _ => None,
            };
            if let Some(b) = base.filter(|b| **b == *before) {
                *b = after.clone();
                let r = r.clone();
                self.put(&r)?;
            }
        }
        Ok(())
    }

    /// Removes a record that went through (or became a conflict).
    pub fn done(&self, id: u64) -> Result<()> {
        self.records.lock().unwrap().retain(|r| r.id != id);
        self.delete(id)
    }
}

/// Later fields win.
fn merge_setattr(into: &mut SetAttr, later: &SetAttr) {
    into.mode = later.mode.or(into.mode);
    into.uid = later.uid.or(into.uid);
    into.gid = later.gid.or(into.gid);
    into.size = later.size.or(into.size);
    into.atime = later.atime.or(into.atime);
    into.mtime = later.mtime.or(into.mtime);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cml() -> Cml {
        let db = sled::Config::new().temporary(true).open().unwrap();
        Cml::open(&db).unwrap()
    }

    fn vv(n: u64) -> VersionVector {
        let mut v = VersionVector::new();
        for _ in 0..n {
            v.increment(uuid::Uuid::from_u128(1));
        }
        v
    }

    #[test]
    fn repeated_stores_keep_one_with_the_first_base() {
        let c = cml();
        for i in 0..100 {
            c.append(CmlOp::Store { fid: Fid(7), base: vv(3 + i), mode: None }, None).unwrap();
        }
        let r = c.records();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].op, CmlOp::Store { fid: Fid(7), base: vv(3), mode: None });
    }

    #[test]
    fn create_then_remove_leaves_nothing() {
        let c = cml();
        let l = Fid::local(1);
        c.append(CmlOp::Create { dir: Fid::ROOT, name: "tmp".into(), fid: l, mode: 0o644 }, None).unwrap();
        c.append(CmlOp::Store { fid: l, base: VersionVector::new(), mode: None }, None).unwrap();
        c.append(
            CmlOp::Rename {
                from_dir: Fid::ROOT,
                from: "tmp".into(),
                to_dir: Fid::ROOT,
                to: "t2".into(),
                fid: l,
                replaced: None,
                replaced_base: None,
            },
            None,
        )
        .unwrap();
        c.append(CmlOp::Remove { dir: Fid::ROOT, name: "t2".into(), fid: l, base: None }, None).unwrap();
        assert!(c.is_empty(), "{:?}", c.records());
    }

    #[test]
    fn a_rename_over_an_object_keeps_its_removal() {
        let c = cml();
        let l = Fid::local(1);
        c.append(CmlOp::Create { dir: Fid::ROOT, name: "new".into(), fid: l, mode: 0o644 }, None).unwrap();
        c.append(
            CmlOp::Rename {
                from_dir: Fid::ROOT,
                from: "new".into(),
                to_dir: Fid::ROOT,
                to: "old".into(),
                fid: l,
                replaced: Some(Fid(9)),
                replaced_base: Some(vv(1)),
            },
            None,
        )
        .unwrap();
        c.append(CmlOp::Remove { dir: Fid::ROOT, name: "old".into(), fid: l, base: None }, None).unwrap();
        let r = c.records();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].op, CmlOp::Remove { dir: Fid::ROOT, name: "old".into(), fid: Fid(9), base: Some(vv(1)) });
    }

    #[test]
    fn setattrs_fold_into_the_next_store_and_merge() {
        let c = cml();
        let set = |mode| SetAttr { mode: Some(mode), ..Default::default() };
        c.append(CmlOp::SetAttr { fid: Fid(5), set: set(0o600), base: None }, None).unwrap();
        c.append(CmlOp::SetAttr { fid: Fid(5), set: set(0o640), base: None }, None).unwrap();
        assert_eq!(c.len(), 1);
        c.append(CmlOp::Store { fid: Fid(5), base: vv(1), mode: None }, None).unwrap();
        let r = c.records();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].op, CmlOp::Store { fid: Fid(5), base: vv(1), mode: Some(0o640) });
    }

    #[test]
    fn rename_chains_keep_the_final_effect() {
        let c = cml();
        let ren = |a: &str, b: &str| CmlOp::Rename {
            from_dir: Fid::ROOT,
            from: a.into(),
            to_dir: Fid::ROOT,
            to: b.into(),
            fid: Fid(4),
            replaced: None,
            replaced_base: None,
        };
        c.append(ren("a", "b"), None).unwrap();
        c.append(ren("b", "c"), None).unwrap();
        c.append(ren("c", "d"), None).unwrap();
        assert_eq!(c.records().iter().map(|r| r.op.clone()).collect::<Vec<_>>(), vec![ren("a", "d")]);
        c.append(ren("d", "a"), None).unwrap();
        assert!(c.is_empty(), "a rename back to the start is no change");
    }

    #[test]
    fn renames_fold_only_into_the_record_just_before() {
        let c = cml();
        let ren = |a: &str, b: &str, fid: u64| CmlOp::Rename {
            from_dir: Fid::ROOT,
            from: a.into(),
            to_dir: Fid::ROOT,
            to: b.into(),
            fid: Fid(fid),
            replaced: None,
            replaced_base: None,
        };
        // A swap through a temporary name: three renames, in order.
        c.append(ren("x", "tmp", 1), None).unwrap();
        c.append(ren("y", "x", 2), None).unwrap();
        c.append(ren("tmp", "y", 1), None).unwrap();
        let ops: Vec<_> = c.records().into_iter().map(|r| r.op).collect();
        assert_eq!(ops, vec![ren("x", "tmp", 1), ren("y", "x", 2), ren("tmp", "y", 1)]);
    }

    #[test]
    fn a_hard_linked_offline_file_survives_removing_its_first_name() {
        let c = cml();
        let l = Fid::local(1);
        c.append(CmlOp::Create { dir: Fid::ROOT, name: "a".into(), fid: l, mode: 0o644 }, None).unwrap();
        c.append(CmlOp::Store { fid: l, base: VersionVector::new(), mode: None }, None).unwrap();
        c.append(CmlOp::Link { fid: l, dir: Fid::ROOT, name: "b".into() }, None).unwrap();
        c.append(CmlOp::Remove { dir: Fid::ROOT, name: "a".into(), fid: l, base: None }, None).unwrap();
        assert_eq!(c.len(), 4, "nothing may be cancelled: {:?}", c.records());
    }

    #[test]
    fn the_last_chmod_wins_when_folded() {
        let c = cml();
        let set = |mode| SetAttr { mode: Some(mode), ..Default::default() };
        c.append(CmlOp::SetAttr { fid: Fid(5), set: set(0o600), base: None }, None).unwrap();
        c.append(CmlOp::SetAttr { fid: Fid(6), set: set(0o600), base: None }, None).unwrap();
        c.append(CmlOp::SetAttr { fid: Fid(5), set: set(0o644), base: None }, None).unwrap();
        c.append(CmlOp::Store { fid: Fid(5), base: vv(1), mode: None }, None).unwrap();
        let store = c.records().into_iter().find(|r| matches!(r.op, CmlOp::Store { .. })).unwrap();
        assert_eq!(store.op, CmlOp::Store { fid: Fid(5), base: vv(1), mode: Some(0o644) });
    }

    #[test]
    fn removing_a_file_edited_offline_drops_its_stores() {
        let c = cml();
        c.append(CmlOp::Store { fid: Fid(7), base: vv(2), mode: None }, None).unwrap();
        c.append(
            CmlOp::SetAttr { fid: Fid(7), set: SetAttr { mode: Some(0o600), ..Default::default() }, base: Some(vv(2)) },
            None,
        )
        .unwrap();
        c.drop_unsent_changes(Fid(7)).unwrap();
        c.append(CmlOp::Remove { dir: Fid::ROOT, name: "f".into(), fid: Fid(7), base: Some(vv(2)) }, None).unwrap();
        let ops: Vec<_> = c.records().into_iter().map(|r| r.op).collect();
        assert_eq!(ops, vec![CmlOp::Remove { dir: Fid::ROOT, name: "f".into(), fid: Fid(7), base: Some(vv(2)) }]);
    }

    #[test]
    fn sent_records_are_never_rewritten() {
        let c = cml();
        c.append(CmlOp::Store { fid: Fid(7), base: vv(1), mode: None }, Some(42)).unwrap();
        c.append(CmlOp::Store { fid: Fid(7), base: vv(1), mode: None }, None).unwrap();
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_log_survives_reopening() {
        let dir = std::env::temp_dir().join(format!("cml-test-{}", uuid::Uuid::new_v4()));
        {
            let db = sled::open(&dir).unwrap();
            let c = Cml::open(&db).unwrap();
            c.append(CmlOp::Mkdir { dir: Fid::ROOT, name: "d".into(), fid: Fid::local(1), mode: 0o755 }, None).unwrap();
            c.append(CmlOp::Store { fid: Fid(3), base: vv(2), mode: None }, Some(9)).unwrap();
            db.flush().unwrap();
        }
        let db = sled::open(&dir).unwrap();
        let c = Cml::open(&db).unwrap();
        let r = c.records();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].seq, Some(9));
        drop(c);
        drop(db);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
