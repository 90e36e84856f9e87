//! Whole-file transfers in pipelined chunks.
//!
//! A fetch or store of any size holds at most [`FETCH_WINDOW`] chunks in
//! memory: chunk requests are kept in flight so the link stays busy, and each
//! chunk is written at its offset as it arrives.

use super::client::{Client, RpcError};
use super::landing::Sink;
use crate::attr::Timestamp;
use crate::error::FsError;
use crate::fid::Fid;
use crate::frame::CHUNK_SIZE;
use crate::proto::*;
use crate::version_vector::VersionVector;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Chunk requests kept in flight by one transfer.
pub const FETCH_WINDOW: usize = 8;

fn io_err(e: std::io::Error) -> RpcError {
    RpcError::Fs(FsError::from(e))
}

/// Fetches the whole file `fid` into `dest` (truncated to the file's size).
/// Returns the fetch reply, whose attributes describe exactly the bytes written.
pub async fn fetch_to_file(client: &Client, fid: Fid, dest: Arc<File>) -> Result<FetchReply, RpcError> {
    let mut reply = client.fetch(FetchReq { fid, inline_max: CHUNK_SIZE as u32 }).await?;
    let size = reply.attr.size;
    let first = std::mem::take(&mut reply.data);
    // Only a file with old content is truncated: on ext4 a truncation to
    // zero marks the file for a flush on close (for programs that rewrite
    // files in place), which for a fresh 1 GiB container means a
    // synchronous writeback of all of it when it is closed.
    if dest.metadata().map_err(io_err)?.len() > 0 {
        dest.set_len(0).map_err(io_err)?;
    }
    if reply.handle.is_some() {
        reserve(&dest, size);
    }
    dest.write_all_at(&first, 0).map_err(io_err)?;
    if let Some(handle) = reply.handle {
        let result = fetch_rest(client, handle, first.len() as u64, size, &dest).await;
        // Release even after a failure, so the server can drop its handle.
        let _ = client.release(ReleaseReq { handle }).await;
        result?;
    }
    dest.set_len(size).map_err(io_err)?;
    Ok(reply)
}

/// Allocates the file's blocks before the chunks land. Landing then only
/// copies: a filesystem that allocates blocks on write (ext4's delayed
/// allocation) otherwise reserves space and records an extent for every
/// page as it is written, on the one thread that lands them. A hint: where
/// the filesystem cannot, the chunks allocate as they land.
fn reserve(dest: &File, size: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: an allocation request on an open descriptor; KEEP_SIZE leaves
    // the size to the bytes actually written.
    unsafe { libc::fallocate(dest.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, size as libc::off_t) };
}

/// Keeps [`FETCH_WINDOW`] chunk requests in flight. Each lands in `dest` at
/// its offset as it arrives (see `landing`); they are checked in order.
async fn fetch_rest(client: &Client, handle: u64, mut next: u64, size: u64, dest: &Arc<File>) -> Result<(), RpcError> {
    let mut inflight = VecDeque::new();
    loop {
        while next < size && inflight.len() < FETCH_WINDOW {
            let len = (size - next).min(CHUNK_SIZE as u64) as u32;
            let (c, offset) = (client.clone(), next);
            let sink = Sink { file: dest.clone(), offset };
            inflight.push_back((
                offset,
                len,
                tokio::spawn(async move { c.read_chunk_to(ReadChunkReq { handle, offset, len }, sink).await }),
            ));
            next += len as u64;
        }
        let Some((offset, len, task)) = inflight.pop_front() else { return Ok(()) };
        let written = match task.await {
            Ok(r) => r?,
            Err(e) => return Err(RpcError::Protocol(format!("chunk task failed: {e}"))),
        };
        if written != len as usize {
            return Err(RpcError::Fs(FsError::Io(format!(
                "short chunk at {offset}: {written} of {len} bytes (file changed on the server?)"
            ))));
        }
    }
}

/// Stores the whole content of `src` as the new content of `fid`, based on
/// version `base`. Small files go inline; large ones are staged in chunks
/// first, and the store that publishes them is a single at-most-once call.
pub async fn store_from_file(
    client: &Client,
    fid: Fid,
    base: VersionVector,
    src: Arc<File>,
    mtime: Option<Timestamp>,
    mode: Option<u32>,
) -> Result<EntryReply, RpcError> {
    let seq = client.allocate_sequence();
    let r = store_with_seq(client, seq, fid, base, src, mtime, mode).await;
    client.unhold(seq);
    r
}

/// Stores under a given transaction id (see [`Client::call_with_seq`]): a
/// retry after a failure reuses it, so the store runs at most once.
pub async fn store_with_seq(
    client: &Client,
    seq: u64,
    fid: Fid,
    base: VersionVector,
    src: Arc<File>,
    mtime: Option<Timestamp>,
    mode: Option<u32>,
) -> Result<EntryReply, RpcError> {
    let req = store_request(client, fid, base, src, mtime, mode).await?;
    match client.call_with_seq(seq, Request::Store(req)).await? {
        Reply::Store(r) => Ok(r),
        _ => Err(RpcError::Protocol("reply of the wrong kind to a store".into())),
    }
}

/// Builds a store request: small content inline, large content staged on
/// the server first (staging is idempotent and needs no transaction id).
pub async fn store_request(
    client: &Client,
    fid: Fid,
    base: VersionVector,
    src: Arc<File>,
    mtime: Option<Timestamp>,
    mode: Option<u32>,
) -> Result<StoreReq, RpcError> {
    let size = src.metadata().map_err(io_err)?.len();
    let data = if size <= CHUNK_SIZE as u64 {
        let mut buf = vec![0u8; size as usize];
        src.read_exact_at(&mut buf, 0).map_err(io_err)?;
        StoreData::Inline(buf.into())
    } else {
        let handle = client.stage_open(StageOpenReq {}).await?.handle;
        if let Err(e) = stage_all(client, handle, size, &src).await {
            let _ = client.release(ReleaseReq { handle }).await;
            return Err(e);
        }
        StoreData::Staged(handle)
    };
    Ok(StoreReq { fid, base, size, data, mtime, mode })
}

async fn stage_all(client: &Client, handle: u64, size: u64, src: &Arc<File>) -> Result<(), RpcError> {
    let mut inflight = JoinSet::new();
    let mut next = 0u64;
    loop {
        while next < size && inflight.len() < FETCH_WINDOW {
            let len = (size - next).min(CHUNK_SIZE as u64) as usize;
            let (c, s, offset) = (client.clone(), src.clone(), next);
            inflight.spawn(async move {
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len];
                    s.read_exact_at(&mut buf, offset).map(|_| buf)
                })
                .await
                .map_err(|e| RpcError::Protocol(e.to_string()))?
                .map_err(io_err)?;
                c.stage_write(StageWriteReq { handle, offset, data: data.into() }).await
            });
            next += len as u64;
        }
        match inflight.join_next().await {
            None => return Ok(()),
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => return Err(e),
            Some(Err(e)) => return Err(RpcError::Protocol(format!("chunk task failed: {e}"))),
        }
    }
}
