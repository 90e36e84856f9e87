//! Framing: a 4-byte big-endian length, then the frame.
//!
//! The handshake uses plain frames: an rmp-serde body. After it, every
//! [`Message`] travels as `[u32 body length][body][payload]`, where the
//! payload is the bulk bytes the message carries (file data of fetches,
//! chunks and staged writes), sent as they are after the encoded body: file data is
//! never copied into an encoding buffer nor decoded out of one, and a chunk
//! arrives in a buffer of its own, ready to be written to disk.
//!
//! All encoding and decoding of wire messages lives here. A frame longer than
//! [`MAX_FRAME`] is refused before its body is read, so a hostile or broken
//! peer cannot make us allocate without bound; a body that does not decode is
//! an error, never a panic.

use crate::error::FsError;
use crate::payload::Payload;
use crate::proto::{Push, Reply, Request, Xid};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use uuid::Uuid;

/// The largest frame either side accepts: one bulk chunk plus headroom.
pub const MAX_FRAME: usize = 4 << 20;

/// Bulk data moves in pieces of this size.
pub const CHUNK_SIZE: usize = 1 << 20;

/// Protocol magic, the first field of the first frame: "AFS\x01".
pub const MAGIC: u32 = 0x4146_5301;

/// The protocol version this build speaks (2: payloads outside the body;
/// 3: creates may carry content).
pub const PROTOCOL_VERSION: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// The first message of a connection, client to server. Its shape never
/// changes between versions, so any server can read it and say what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: u32,
    pub version: u32,
    pub client: Uuid,
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

/// Everything after the hello, in both directions.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    /// Server: prove you hold the key by MACing this nonce.
    Challenge {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
    },
    /// Client: the MAC over the server's challenge.
    Proof {
        #[serde(with = "serde_bytes")]
        mac: Vec<u8>,
    },
    /// Server: accepted; the MAC proves the server holds the key too.
    Welcome {
        #[serde(with = "serde_bytes")]
        mac: Vec<u8>,
        server: Uuid,
    },
    /// Either side: the connection is refused, and why.
    Refused {
        reason: String,
    },
    /// Client: a request. `ack` says "I have every reply up to this seq".
    Call {
        xid: Xid,
        ack: u64,
        body: Request,
    },
    /// Server: the reply to the request with this sequence number.
    Return {
        seq: u64,
        result: Result<Reply, FsError>,
    },
    /// Server: an unsolicited message (callback breaks).
    Push(Push),
    /// Client: the break with this id has been applied.
    BreakAck {
        id: u64,
    },
    /// Client: are you there? Server answers with `Pong`.
    Ping,
    Pong,
}

/// Serialises a message into a complete plain frame (length prefix
/// included): the handshake's encoding.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0u8; 4]);
    rmp_serde::encode::write_named(&mut buf, msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Splits one complete frame off the front of `buf`, if there is one.
/// `Ok(None)` means "read more"; oversize lengths are an error at once.
pub fn split_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((&buf[4..4 + len], 4 + len)))
}

/// Reads a frame's length. `Ok(None)` on a clean close between frames.
async fn read_length<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<usize>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(len))
}

fn truncated(e: std::io::Error) -> FrameError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    }
}

/// Reads one frame body. `Ok(None)` on a clean close between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let Some(len) = read_length(r).await? else { return Ok(None) };
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(truncated)?;
    Ok(Some(body))
}

/// A message ready to send: the frame's head (length, body length, body)
/// and the payload that follows it unencoded.
#[derive(Debug)]
pub struct Outgoing {
    head: Vec<u8>,
    payload: Payload,
}

impl Outgoing {
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn head(&self) -> &[u8] {
        &self.head
    }

    pub fn payload(&self) -> &Payload {
        &self.payload
    }
}

/// Takes the bulk bytes out of a message that carries them.
fn take_payload(msg: &mut Message) -> Payload {
    match msg {
        Message::Call { body: Request::StageWrite(w), .. } => std::mem::take(&mut w.data).into(),
        Message::Return { result: Ok(Reply::ReadChunk(c)), .. } => std::mem::take(&mut c.data),
        Message::Return { result: Ok(Reply::Fetch(f)), .. } => std::mem::take(&mut f.data).into(),
        _ => Payload::default(),
    }
}

/// Puts a received payload into its message. A payload on a message that
/// carries none (or, but for a chunk, carries only bytes in memory) is
/// malformed; an empty one is nothing.
pub fn attach_payload(msg: &mut Message, payload: Payload) -> Result<(), FrameError> {
    match (msg, payload) {
        (Message::Return { result: Ok(Reply::ReadChunk(c)), .. }, p) => c.data = p,
        (Message::Call { body: Request::StageWrite(w), .. }, Payload::Bytes(b)) => w.data = b,
        (Message::Return { result: Ok(Reply::Fetch(f)), .. }, Payload::Bytes(b)) => f.data = b,
        (_, p) if p.is_empty() => {}
        _ => return Err(FrameError::Malformed("payload on a message without one".into())),
    }
    Ok(())
}

/// Encodes a message sent after the handshake. The payload is shared with
/// the message, not copied.
pub fn encode_message(mut msg: Message) -> Result<Outgoing, FrameError> {
    let payload = take_payload(&mut msg);
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(&[0u8; 8]);
    rmp_serde::encode::write_named(&mut head, &msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let body = head.len() - 8;
    let len = 4 + body + payload.len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    head[..4].copy_from_slice(&(len as u32).to_be_bytes());
    head[4..8].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(Outgoing { head, payload })
}

/// Reads one message sent after the handshake. `Ok(None)` on a clean close
/// between frames. The payload is read straight into its own buffer.
pub async fn read_message_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, FrameError> {
    let Some((mut msg, payload_len)) = read_message_head(r).await? else { return Ok(None) };
    let payload = read_payload(r, payload_len).await?;
    attach_payload(&mut msg, payload.into())?;
    Ok(Some(msg))
}

/// Reads a message up to its payload: returns the message and the length
/// of the payload that follows it on the stream, which the caller must
/// consume next (with [`read_payload`], or by landing it in a file).
pub async fn read_message_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(len) = read_length(r).await? else { return Ok(None) };
    if len < 4 {
        return Err(FrameError::Malformed(format!("frame of {len} bytes has no body length")));
    }
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await.map_err(truncated)?;
    let body_len = u32::from_be_bytes(b) as usize;
    if body_len > len - 4 {
        return Err(FrameError::Malformed(format!("body of {body_len} bytes in a frame of {len}")));
    }
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).await.map_err(truncated)?;
    let msg: Message = decode(&body)?;
    Ok(Some((msg, len - 4 - body_len)))
}

/// Reads a payload of `len` bytes into a buffer of its own.
pub async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Bytes, FrameError> {
    let mut payload = BytesMut::with_capacity(len);
    while payload.len() < len {
        let want = len - payload.len();
        if r.read_buf(&mut (&mut payload).limit(want)).await? == 0 {
            return Err(FrameError::Truncated);
        }
    }
    Ok(payload.freeze())
}

/// Reads and decodes one message; a clean close is an error here.
pub async fn read_message<R: AsyncRead + Unpin, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    match read_frame(r).await? {
        Some(body) => decode(&body),
        None => Err(FrameError::Truncated),
    }
}

pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::{Attr, FileKind, Timestamp};
    use crate::fid::Fid;
    use crate::proto::*;
    use crate::version_vector::VersionVector;

    fn attr() -> Attr {
        let mut version = VersionVector::new();
        version.increment(Uuid::from_u128(7));
        Attr {
            fid: Fid(9),
            kind: FileKind::File,
            size: 3,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            atime: Timestamp::now(),
            mtime: Timestamp::now(),
            ctime: Timestamp::now(),
            version,
        }
    }

    fn wire(out: &Outgoing) -> Vec<u8> {
        let mut bytes = out.head().to_vec();
        match out.payload() {
            Payload::Bytes(b) => bytes.extend_from_slice(b),
            Payload::File(_) => panic!("the tests send bytes only"),
        }
        bytes
    }

    fn read_back(bytes: &[u8]) -> Result<Option<Message>, FrameError> {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = bytes;
            let msg = read_message_frame(&mut r).await;
            if msg.is_ok() {
                assert!(r.is_empty(), "the frame was not read to its end");
            }
            msg
        })
    }

    fn round_trip(msg: Message) -> Message {
        read_back(&wire(&encode_message(msg).unwrap())).unwrap().unwrap()
    }

    #[test]
    fn messages_round_trip() {
        let xid = Xid { client: Uuid::from_u128(1), seq: 5 };
        let call = Message::Call {
            xid,
            ack: 4,
            body: Request::Create(CreateReq {
                dir: Fid::ROOT,
                name: "a".into(),
                mode: 0o600,
                exclusive: true,
                content: None,
            }),
        };
        match round_trip(call) {
            Message::Call { xid: x, ack: 4, body: Request::Create(c) } => {
                assert_eq!(x, xid);
                assert_eq!(c.name, "a");
                assert!(c.exclusive);
            }
            other => panic!("unexpected {other:?}"),
        }
        let ret = Message::Return {
            seq: 5,
            result: Ok(Reply::Fetch(FetchReply {
                attr: attr(),
                promise: None,
                data: b"abc".to_vec().into(),
                handle: Some(3),
            })),
        };
        match round_trip(ret) {
            Message::Return { seq: 5, result: Ok(Reply::Fetch(f)) } => {
                assert_eq!(f.attr, attr_like(&f.attr));
                assert_eq!(&f.data[..], b"abc");
                assert_eq!(f.handle, Some(3));
            }
            other => panic!("unexpected {other:?}"),
        }
        let err = Message::Return { seq: 6, result: Err(FsError::Conflict(Box::new(attr()))) };
        assert!(matches!(round_trip(err), Message::Return { seq: 6, result: Err(FsError::Conflict(_)) }));
        let push = Message::Push(Push::Break { id: 1, fids: vec![Fid(3), Fid(4)] });
        assert!(matches!(round_trip(push), Message::Push(Push::Break { id: 1, fids }) if fids == vec![Fid(3), Fid(4)]));
        let hello = Hello { magic: MAGIC, version: PROTOCOL_VERSION, client: Uuid::from_u128(3), nonce: vec![1; 32] };
        let frame = encode(&hello).unwrap();
        assert_eq!(decode::<Hello>(&frame[4..]).unwrap(), hello);
    }

    fn attr_like(a: &Attr) -> Attr {
        a.clone()
    }

    #[test]
    fn chunk_payloads_travel_outside_the_body() {
        // 1 MiB of data costs 1 MiB on the wire, after a small head.
        let data = Bytes::from(vec![0xabu8; CHUNK_SIZE]);
        let msg = Message::Return { seq: 1, result: Ok(Reply::ReadChunk(Chunk { data: data.clone().into() })) };
        let out = encode_message(msg).unwrap();
        assert!(out.head().len() < 64, "head is {} bytes", out.head().len());
        assert!(matches!(out.payload(), Payload::Bytes(b) if *b == data), "the payload is the chunk's bytes");
        match read_back(&wire(&out)).unwrap().unwrap() {
            Message::Return { seq: 1, result: Ok(Reply::ReadChunk(c)) } => {
                assert_eq!(c.data.into_bytes(), Some(data.clone()))
            }
            other => panic!("unexpected {other:?}"),
        }
        let write = Message::Call {
            xid: Xid { client: Uuid::nil(), seq: 2 },
            ack: 1,
            body: Request::StageWrite(StageWriteReq { handle: 4, offset: 8, data: data.clone() }),
        };
        match round_trip(write) {
            Message::Call { body: Request::StageWrite(w), .. } => {
                assert_eq!((w.handle, w.offset, w.data), (4, 8, data))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversize_frames_are_refused_before_reading() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0; 16]);
        assert!(matches!(split_frame(&frame), Err(FrameError::TooLarge(_))));
        assert!(matches!(read_back(&frame), Err(FrameError::TooLarge(_))));
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut r = &frame[..];
            assert!(matches!(read_frame(&mut r).await, Err(FrameError::TooLarge(_))));
        });
        let data = Bytes::from(vec![0; MAX_FRAME + 1]);
        let big = Message::Return { seq: 1, result: Ok(Reply::ReadChunk(Chunk { data: data.into() })) };
        assert!(matches!(encode_message(big), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn inconsistent_lengths_are_malformed() {
        let ping = wire(&encode_message(Message::Ping).unwrap());
        // A body length beyond the frame.
        let mut bad = ping.clone();
        bad[4..8].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(read_back(&bad), Err(FrameError::Malformed(_))));
        // Payload bytes after a message that carries none.
        let mut extra = ping.clone();
        let len = u32::from_be_bytes(extra[..4].try_into().unwrap()) + 3;
        extra[..4].copy_from_slice(&len.to_be_bytes());
        extra.extend_from_slice(b"xyz");
        assert!(matches!(read_back(&extra), Err(FrameError::Malformed(_))));
    }

    #[test]
    fn truncated_input_is_an_error() {
        let frame = encode(&Message::Ping).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            for cut in 1..frame.len() {
                let mut r = &frame[..cut];
                assert!(matches!(read_frame(&mut r).await, Err(FrameError::Truncated)), "cut at {cut}");
                assert!(split_frame(&frame[..cut]).unwrap().is_none());
            }
            let mut empty: &[u8] = &[];
            assert!(read_frame(&mut empty).await.unwrap().is_none());
        });
        assert!(read_back(&[]).unwrap().is_none());
        let chunk = Message::Return {
            seq: 3,
            result: Ok(Reply::ReadChunk(Chunk { data: Bytes::from(vec![1u8; 100]).into() })),
        };
        let bytes = wire(&encode_message(chunk).unwrap());
        for cut in 1..bytes.len() {
            assert!(matches!(read_back(&bytes[..cut]), Err(FrameError::Truncated)), "cut at {cut}");
        }
        // A body cut short decodes to an error, not a panic.
        let call = encode(&Message::Call {
            xid: Xid { client: Uuid::nil(), seq: 1 },
            ack: 0,
            body: Request::Lookup(LookupReq { dir: Fid::ROOT, name: "x".into() }),
        })
        .unwrap();
        for cut in 4..call.len() - 1 {
            assert!(decode::<Message>(&call[4..cut]).is_err());
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut seed = 0x2545F4914F6CDD1Du64;
        for round in 0..20_000 {
            let len = (round % 300) + 1;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode::<Message>(&bytes);
            let _ = decode::<Hello>(&bytes);
            let _ = split_frame(&bytes);
            let _ = read_back(&bytes);
        }
        // Valid frames with flipped bytes too.
        let good = encode(&Message::Call {
            xid: Xid { client: Uuid::from_u128(9), seq: 77 },
            ack: 70,
            body: Request::Rename(RenameReq {
                from_dir: Fid(2),
                from_name: "a".into(),
                to_dir: Fid(3),
                to_name: "b".into(),
                no_replace: false,
                replaced_base: None,
            }),
        })
        .unwrap();
        for i in 4..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                let _ = decode::<Message>(&bad[4..]);
            }
        }
    }
}
