//! The protocol: every operation afsd offers, defined once.
//!
//! The [`operations!`] table below is the single definition. From it follow
//! the wire enums [`Request`] and [`Reply`], the [`OpKind`] used for stats,
//! whether an operation mutates (and so is executed at most once), the typed
//! client stubs on [`crate::rpc::Client`] and the server's [`Service`] trait
//! with its [`dispatch`] function. Adding an operation means adding one line
//! to the table and one method to the server.

use crate::attr::{Attr, DirEntry, FsStats, SetAttr, Timestamp};
use crate::error::FsError;
use crate::fid::Fid;
pub use crate::payload::{FileSlice, Payload};
use crate::version_vector::VersionVector;
pub use bytes::Bytes;

/// Serde for a `Bytes` field encoded inside the message body.
mod bytes_in_body {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(&b[..], s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        serde_bytes::ByteBuf::deserialize(d).map(|b| Bytes::from(b.into_vec()))
    }
}
use serde::{Deserialize, Serialize};
use std::future::Future;
use uuid::Uuid;

/// Identifies a request across retransmissions and server restarts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xid {
    pub client: Uuid,
    pub seq: u64,
}

/// What the server knows about the caller of one request.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub xid: Xid,
    /// Distinguishes successive connections of one client.
    pub conn: u64,
}

impl CallContext {
    pub fn client(&self) -> Uuid {
        self.xid.client
    }
}

/// A callback promise: the server will tell this client when the object
/// changes, until `expires` (seconds since the epoch) at the latest.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promise {
    pub expires: i64,
}

/// Messages the server sends without being asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Push {
    /// These objects changed: drop or revalidate cached copies, then answer
    /// with `BreakAck { id }`. The server holds the reply to the change for
    /// a moment until holders acknowledge, so once a program sees a change
    /// complete on one client, no other client still answers from the old copy.
    Break { id: u64, fids: Vec<Fid> },
    /// Too much changed to say what: revalidate everything.
    BreakAll,
}

// ---- request and reply bodies -------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LookupReq {
    pub dir: Fid,
    pub name: String,
}

/// A name's object plus a promise on it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EntryReply {
    pub attr: Attr,
    pub promise: Option<Promise>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetAttrReq {
    pub fid: Fid,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadDirReq {
    pub dir: Fid,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadDirReply {
    pub attr: Attr,
    pub entries: Vec<DirEntry>,
    pub promise: Option<Promise>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchReq {
    pub fid: Fid,
    /// Up to this many bytes come back inline; the rest is read in chunks.
    pub inline_max: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FetchReply {
    pub attr: Attr,
    pub promise: Option<Promise>,
    /// The first bytes of the file (the symlink target for a symlink).
    /// Bulk bytes travel after the encoded message (see `frame`).
    #[serde(skip)]
    pub data: Bytes,
    /// Set when more data follows: read it with `ReadChunk`, then release
    /// it. The handle pins the fetched version, so chunks never mix versions.
    pub handle: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadChunkReq {
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Chunk {
    /// The server sends a range of the fetched file (see `payload`).
    #[serde(skip)]
    pub data: Payload,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReleaseReq {
    pub handle: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageOpenReq {}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageHandle {
    pub handle: u64,
}

/// Writes at an offset are idempotent, so staging needs no reply record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageWriteReq {
    pub handle: u64,
    pub offset: u64,
    #[serde(skip)]
    pub data: Bytes,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum StoreData {
    /// Small content, inside the encoded body (stores also travel inside
    /// reintegration batches, where no payload slot exists).
    Inline(#[serde(with = "bytes_in_body")] Bytes),
    /// A file staged with `StageOpen`/`StageWrite`; the store consumes it.
    Staged(u64),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreReq {
    pub fid: Fid,
    /// The version the new content was based on. If the server's version is
    /// not this one the store is refused with `FsError::Conflict`.
    pub base: VersionVector,
    pub size: u64,
    pub data: StoreData,
    pub mtime: Option<Timestamp>,
    pub mode: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CreateReq {
    pub dir: Fid,
    pub name: String,
    pub mode: u32,
    /// O_EXCL: fail with `Exists` when the name is taken.
    pub exclusive: bool,
    /// The new file's content, for a client that creates a file only when
    /// it is first closed: one commit instead of a create and a store. A
    /// create with content never opens an existing file (`Exists`).
    pub content: Option<NewContent>,
}

/// Content up to this size is written in place by the commit's intent
/// (larger content is staged and renamed into place).
pub const CREATE_CONTENT_MAX: usize = 64 * 1024;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewContent {
    /// As a store's: inline, or staged beforehand.
    pub data: StoreData,
    pub size: u64,
    pub mtime: Timestamp,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MkdirReq {
    pub dir: Fid,
    pub name: String,
    pub mode: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SymlinkReq {
    pub dir: Fid,
    pub name: String,
    pub target: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkReq {
    pub fid: Fid,
    pub dir: Fid,
    pub name: String,
}

/// A created or linked name: the new object and its directory afterwards.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewEntry {
    pub attr: Attr,
    pub dir: Attr,
    pub promise: Option<Promise>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveReq {
    pub dir: Fid,
    pub name: String,
    /// When set, refuse with `Conflict` if the object is no longer this version.
    pub base: Option<VersionVector>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RmdirReq {
    pub dir: Fid,
    pub name: String,
}

/// A directory after a change to its entries.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirChanged {
    pub dir: Attr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenameReq {
    pub from_dir: Fid,
    pub from_name: String,
    pub to_dir: Fid,
    pub to_name: String,
    /// Refuse (`Exists`) instead of replacing an existing target.
    pub no_replace: bool,
    /// When set, refuse with `Conflict` if the target exists and is no longer
    /// this version (a replacement decided on an old view, at reintegration).
    #[serde(default)]
    pub replaced_base: Option<VersionVector>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenameReply {
    pub from_dir: Attr,
    pub to_dir: Attr,
    pub moved: Attr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SetAttrReq {
    pub fid: Fid,
    pub set: SetAttr,
    pub base: Option<VersionVector>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatFsReq {}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidateReq {
    pub items: Vec<(Fid, VersionVector)>,
}

/// One answer per item, in order: still current (and the promise renewed)
/// or not.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ValidateReply {
    pub current: Vec<bool>,
    pub promise: Option<Promise>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeStampReq {}

/// Changes on every mutation of the volume. `volume` names the volume's
/// incarnation, so a re-created state directory is never mistaken for the old.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeStamp {
    pub volume: Uuid,
    pub stamp: u64,
}

/// A batch of logged operations from a client that was disconnected. Each
/// record carries its own transaction id, so a reintegration interrupted
/// mid-way can be resent whole and nothing in it runs twice.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReintegrateReq {
    pub records: Vec<ReintegrateRecord>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReintegrateRecord {
    /// The record's own transaction sequence number.
    pub seq: u64,
    /// For a create, mkdir or symlink: the local fid the client gave the new
    /// object. Later records of the batch may name it; the server replaces
    /// it with the object's real fid.
    pub creates: Option<Fid>,
    pub req: Request,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReintegrateReply {
    pub results: Vec<Result<Reply, FsError>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReadlinkReq {
    pub fid: Fid,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkTarget {
    pub target: String,
}

// ---- the one definition ---------------------------------------------------------

/// A request type that knows its reply type.
pub trait Operation: Sized {
    type Reply;
    const KIND: OpKind;
    fn into_request(self) -> Request;
    fn from_reply(reply: Reply) -> Option<Self::Reply>;
}

macro_rules! operations {
    ($( $(#[$doc:meta])* $method:ident: $name:ident($req:ty) -> $reply:ty, $mutates:expr; )*) => {
        /// Every request, as it travels on the wire.
        #[derive(Clone, Debug, Serialize, Deserialize)]
        pub enum Request { $( $(#[$doc])* $name($req), )* }

        /// Every successful reply, as it travels on the wire.
        #[derive(Clone, Debug, Serialize, Deserialize)]
        pub enum Reply { $( $name($reply), )* }

        /// The kind of an operation, for counters and logs.
        #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind { $( $name, )* }

        impl OpKind {
            pub const ALL: &'static [OpKind] = &[$( OpKind::$name, )*];

            pub fn name(self) -> &'static str {
                match self { $( OpKind::$name => stringify!($method), )* }
            }

            /// Mutations change the volume and are executed at most once.
            pub fn mutates(self) -> bool {
                match self { $( OpKind::$name => $mutates, )* }
            }
        }

        impl Request {
            pub fn kind(&self) -> OpKind {
                match self { $( Request::$name(_) => OpKind::$name, )* }
            }
        }

        impl Request {
            /// Rewrites every fid a mutation names (for local fids in
            /// reintegration). Reads are left alone.
            pub fn map_fids(&mut self, f: impl Fn(Fid) -> Fid) {
                match self {
                    Request::Store(r) => r.fid = f(r.fid),
                    Request::Create(r) => r.dir = f(r.dir),
                    Request::Mkdir(r) => r.dir = f(r.dir),
                    Request::Symlink(r) => r.dir = f(r.dir),
                    Request::Link(r) => {
                        r.fid = f(r.fid);
                        r.dir = f(r.dir);
                    }
                    Request::Remove(r) => r.dir = f(r.dir),
                    Request::Rmdir(r) => r.dir = f(r.dir),
                    Request::Rename(r) => {
                        r.from_dir = f(r.from_dir);
                        r.to_dir = f(r.to_dir);
                    }
                    Request::SetAttr(r) => r.fid = f(r.fid),
                    _ => {}
                }
            }
        }

        $(
            impl Operation for $req {
                type Reply = $reply;
                const KIND: OpKind = OpKind::$name;
                fn into_request(self) -> Request { Request::$name(self) }
                fn from_reply(reply: Reply) -> Option<$reply> {
                    match reply { Reply::$name(r) => Some(r), #[allow(unreachable_patterns)] _ => None }
                }
            }
        )*

        /// The server side of the protocol: one method per operation.
        /// `dispatch` routes a decoded request here.
        pub trait Service: Send + Sync + 'static {
            $(
                $(#[$doc])*
                fn $method(&self, cx: &CallContext, req: $req)
                    -> impl Future<Output = Result<$reply, FsError>> + Send;
            )*
        }

        /// Runs one request against a service.
        pub async fn dispatch<S: Service>(service: &S, cx: &CallContext, req: Request) -> Result<Reply, FsError> {
            match req { $( Request::$name(r) => service.$method(cx, r).await.map(Reply::$name), )* }
        }

        impl crate::rpc::Client {
            $(
                $(#[$doc])*
                pub async fn $method(&self, req: $req) -> Result<$reply, crate::rpc::RpcError> {
                    self.call(req).await
                }
            )*
        }
    };
}

operations! {
    /// Finds a name in a directory.
    lookup: Lookup(LookupReq) -> EntryReply, false;
    /// Attributes of one object.
    getattr: GetAttr(GetAttrReq) -> EntryReply, false;
    /// A whole directory, with a promise on it.
    readdir: ReadDir(ReadDirReq) -> ReadDirReply, false;
    /// Starts a whole-file fetch, with a promise on the file.
    fetch: Fetch(FetchReq) -> FetchReply, false;
    /// The next piece of a fetch.
    read_chunk: ReadChunk(ReadChunkReq) -> Chunk, false;
    /// Ends a fetch or abandons a staged store.
    release: Release(ReleaseReq) -> (), false;
    /// The target of a symlink.
    readlink: Readlink(ReadlinkReq) -> LinkTarget, false;
    /// Starts staging the content of a large store.
    stage_open: StageOpen(StageOpenReq) -> StageHandle, false;
    /// Writes staged content at an offset.
    stage_write: StageWrite(StageWriteReq) -> (), false;
    /// Replaces a file's content whole, if the base version still holds.
    store: Store(StoreReq) -> EntryReply, true;
    /// Creates a regular file (exclusively with O_EXCL).
    create: Create(CreateReq) -> NewEntry, true;
    mkdir: Mkdir(MkdirReq) -> NewEntry, true;
    symlink: Symlink(SymlinkReq) -> NewEntry, true;
    /// A hard link to an existing file.
    link: Link(LinkReq) -> NewEntry, true;
    remove: Remove(RemoveReq) -> DirChanged, true;
    rmdir: Rmdir(RmdirReq) -> DirChanged, true;
    rename: Rename(RenameReq) -> RenameReply, true;
    setattr: SetAttr(SetAttrReq) -> EntryReply, true;
    statfs: StatFs(StatFsReq) -> FsStats, false;
    /// Checks a batch of cached versions in one call.
    validate: Validate(ValidateReq) -> ValidateReply, false;
    /// The volume's version stamp: equal stamps mean nothing changed.
    volume_stamp: VolumeStamp(VolumeStampReq) -> VolumeStamp, false;
    /// Replays a disconnected client's log.
    reintegrate: Reintegrate(ReintegrateReq) -> ReintegrateReply, true;
}
