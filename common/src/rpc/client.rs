//! The client end of the RPC layer.
//!
//! Each call gets a transaction id (client uuid, sequence number) that stays
//! the same across retransmissions: after an attempt times out, or after the
//! connection drops and is re-established, the same request is sent again and
//! the server's reply cache makes sure a mutation runs at most once. Every call
//! also carries a cumulative acknowledgement (the highest seq below which every
//! reply has arrived) so the server can forget old replies.

use super::landing::{Landed, Lander, Sink, Sinks};
use super::outbox::{Frame, Outbox};
use super::socket::{self, ReadHalf};
use crate::auth::{random_bytes, Key, NONCE_LEN};
use crate::error::FsError;
use crate::frame::{self, FrameError, Hello, Message, MAGIC, PROTOCOL_VERSION};
use crate::payload::{FileSlice, Payload};
use crate::proto::{Operation, Push, ReadChunkReq, Reply, Request, Xid};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use uuid::Uuid;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RpcError {
    /// The server ran the operation and said no.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The server turned the connection away (wrong key, wrong version).
    #[error("refused by server: {0}")]
    Refused(String),
    /// No reply within the call's deadline, retransmissions included.
    #[error("no reply from server within {0:?}")]
    Timeout(Duration),
    /// The server could not be reached.
    #[error("cannot reach server: {0}")]
    Unreachable(String),
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl RpcError {
    /// True when the failure says nothing about the operation itself: the
    /// server may simply be away, and the caller may try again later.
    pub fn is_transport(&self) -> bool {
        matches!(self, RpcError::Timeout(_) | RpcError::Unreachable(_))
    }
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub addr: String,
    pub key: Key,
    pub client_id: Uuid,
    /// How long to wait for a reply before checking the server is alive
    /// and retransmitting.
    pub attempt_timeout: Duration,
    /// How long a call may go without a sign of life from the server (a
    /// reply, or an answer to a ping) before it fails with `Timeout`.
    pub call_timeout: Duration,
    /// How long a call may take in all while the server keeps answering
    /// pings: a slow request (a first listing of a huge directory) is not
    /// a lost server, but nothing waits forever.
    pub busy_limit: Duration,
    pub connect_timeout: Duration,
    /// When false, breaks are acknowledged as soon as they arrive; when
    /// true the owner calls [`Client::ack_break`] after applying them.
    pub manual_break_acks: bool,
}

impl ClientConfig {
    pub fn new(addr: impl Into<String>, key: Key, client_id: Uuid) -> Self {
        ClientConfig {
            addr: addr.into(),
            key,
            client_id,
            attempt_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(30),
            busy_limit: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(3),
            manual_break_acks: false,
        }
    }
}

/// What the connection tells its owner besides replies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// A (new) connection was established and authenticated.
    Connected {
        conn: u64,
    },
    /// The connection dropped.
    Lost {
        conn: u64,
    },
    Push(Push),
}

type Pending = Mutex<HashMap<u64, oneshot::Sender<Result<Reply, FsError>>>>;

/// One live, authenticated connection.
struct Conn {
    id: u64,
    outbox: Outbox,
    pending: Arc<Pending>,
    pings: Arc<Mutex<Vec<oneshot::Sender<()>>>>,
    /// Set by the reader task when the connection ends.
    closed: Arc<AtomicBool>,
    /// Tells the reader task to close the connection.
    kill: Arc<tokio::sync::Notify>,
}

impl Conn {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.outbox.is_closed()
    }
}

struct Inner {
    cfg: ClientConfig,
    next_seq: AtomicU64,
    next_conn: AtomicU64,
    /// Sequence numbers not to be acknowledged yet (calls in flight, and
    /// held ones), with a count: the ack stays below the least.
    outstanding: Mutex<BTreeMap<u64, u32>>,
    /// Sequence numbers persisted as used up to (exclusive), and how to
    /// persist the next block: see [`Client::reserve_sequences`].
    reservation: Mutex<Option<(u64, u64, Reserve)>>,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    events: Mutex<Option<mpsc::UnboundedSender<ClientEvent>>>,
    /// Where the chunk replies of calls in flight land (see `landing`).
    sinks: Sinks,
}

/// Persists "sequence numbers below this one may have been used", durably,
/// before any of them is handed out.
pub type Reserve = Arc<dyn Fn(u64) + Send + Sync>;

/// A cheaply clonable handle to the connection to one server.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// Removes a call from the outstanding set however the call ends.
struct OutstandingGuard<'a>(&'a Inner, u64);
impl Drop for OutstandingGuard<'_> {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

impl Inner {
    fn retain(&self, seq: u64) {
        *self.outstanding.lock().unwrap().entry(seq).or_insert(0) += 1;
    }

    fn release(&self, seq: u64) {
        let mut out = self.outstanding.lock().unwrap();
        if let Some(n) = out.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                out.remove(&seq);
            }
        }
    }
}

impl Client {
    /// Creates a client; the connection is made on first use.
    pub fn new(cfg: ClientConfig) -> Client {
        Client {
            inner: Arc::new(Inner {
                cfg,
                next_seq: AtomicU64::new(1),
                reservation: Mutex::new(None),
                next_conn: AtomicU64::new(1),
                outstanding: Mutex::new(BTreeMap::new()),
                conn: tokio::sync::Mutex::new(None),
                events: Mutex::new(None),
                sinks: Sinks::default(),
            }),
        }
    }

    /// Creates a client and connects at once, so a bad key or an absent
    /// server is reported here.
    pub async fn connect(cfg: ClientConfig) -> Result<Client, RpcError> {
        let c = Client::new(cfg);
        c.ensure_connected().await?;
        Ok(c)
    }

    pub fn id(&self) -> Uuid {
        self.inner.cfg.client_id
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.cfg
    }

    /// Starts the sequence numbers above `seq`: a client that persists its
    /// identity must never reuse a transaction id after a restart.
    pub fn resume_sequence_after(&self, seq: u64) {
        self.inner.next_seq.fetch_max(seq + 1, Ordering::SeqCst);
    }

    /// Makes allocation persist a new limit (`block` further on) whenever
    /// it reaches `limit`, so a restarted owner that resumes after the last
    /// persisted limit never reuses a number, however fast they are used.
    pub fn reserve_sequences(&self, limit: u64, block: u64, persist: Reserve) {
        *self.inner.reservation.lock().unwrap() = Some((limit, block.max(1), persist));
    }

    /// The next sequence number that will be used.
    pub fn next_sequence(&self) -> u64 {
        self.inner.next_seq.load(Ordering::SeqCst)
    }

    /// Reserves a sequence number, held (see [`Client::hold`]) until
    /// [`Client::unhold`]: allocation and hold happen under one lock, so no
    /// concurrent call can acknowledge the number before it is used.
    pub fn allocate_sequence(&self) -> u64 {
        let mut out = self.inner.outstanding.lock().unwrap();
        let seq = self.inner.next_seq.fetch_add(1, Ordering::SeqCst);
        if let Some((limit, block, persist)) = self.inner.reservation.lock().unwrap().as_mut() {
            if seq >= *limit {
                // Allocation is serialised by the lock held here, so no
                // number beyond the persisted limit escapes meanwhile.
                *limit = seq + *block;
                persist(*limit);
            }
        }
        *out.entry(seq).or_insert(0) += 1;
        seq
    }

    /// Keeps the cumulative ack below `seq` until [`Client::unhold`]: the
    /// server must keep the reply of a logged change until the client has
    /// recorded its outcome, even across a client restart.
    pub fn hold(&self, seq: u64) {
        self.inner.retain(seq);
    }

    pub fn unhold(&self, seq: u64) {
        self.inner.release(seq);
    }

    /// Subscribes to connection events and callback breaks. Only the latest
    /// subscriber receives them.
    pub fn events(&self) -> mpsc::UnboundedReceiver<ClientEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.inner.events.lock().unwrap() = Some(tx);
        rx
    }

    /// Whether a connection is up right now (no network traffic).
    pub async fn is_connected(&self) -> bool {
        matches!(&*self.inner.conn.lock().await, Some(c) if !c.is_closed())
    }

    /// Drops the current connection (for tests and for going offline).
    pub async fn disconnect(&self) {
        if let Some(c) = self.inner.conn.lock().await.take() {
            c.closed.store(true, Ordering::SeqCst);
            c.kill.notify_one();
            c.pending.lock().unwrap().clear();
        }
    }

    /// Makes sure a connection is up, establishing one if needed.
    pub async fn ensure_connected(&self) -> Result<(), RpcError> {
        self.connection().await.map(|_| ())
    }

    /// Tells the server a break has been applied (see `manual_break_acks`).
    pub async fn ack_break(&self, id: u64) {
        let conn = self.inner.conn.lock().await.clone();
        if let (Some(c), Ok(f)) = (conn, frame::encode_message(Message::BreakAck { id })) {
            let _ = c.outbox.send(Arc::new(f)).await;
        }
    }

    /// Round trip with no work on the server: a liveness probe.
    pub async fn ping(&self, wait: Duration) -> Result<Duration, RpcError> {
        let start = Instant::now();
        let conn = timeout(wait, self.connection()).await.map_err(|_| RpcError::Timeout(wait))??;
        self.ping_conn(&conn, wait.saturating_sub(start.elapsed())).await?;
        Ok(start.elapsed())
    }

    /// A ping on one given connection: whether the server still reads it.
    async fn ping_conn(&self, conn: &Conn, wait: Duration) -> Result<(), RpcError> {
        let (tx, rx) = oneshot::channel();
        conn.pings.lock().unwrap().push(tx);
        let frame = Arc::new(frame::encode_message(Message::Ping).map_err(|e| RpcError::Protocol(e.to_string()))?);
        let closed = || RpcError::Unreachable("connection closed".into());
        // The send is bounded too: a dead peer can leave the outbox full.
        let round_trip = async {
            conn.outbox.send(frame).await.map_err(|_| closed())?;
            rx.await.map_err(|_| closed())
        };
        timeout(wait, round_trip).await.map_err(|_| RpcError::Timeout(wait))?
    }

    /// Reads a chunk into `sink`: the connection lands the payload in the
    /// file straight from the socket. Returns the bytes written (fewer than
    /// asked at the end of the file).
    pub async fn read_chunk_to(&self, req: ReadChunkReq, sink: Sink) -> Result<usize, RpcError> {
        let seq = self.allocate_sequence();
        self.inner.sinks.lock().unwrap().insert(seq, sink.clone());
        let reply = self.call_with_seq(seq, Request::ReadChunk(req)).await;
        self.inner.sinks.lock().unwrap().remove(&seq);
        self.unhold(seq);
        match reply? {
            Reply::ReadChunk(c) => match c.data {
                Payload::File(landed) => Ok(landed.len),
                // Read into memory (no pipe to be had): written here.
                Payload::Bytes(b) => {
                    super::blocking(|| std::os::unix::fs::FileExt::write_all_at(&*sink.file, &b, sink.offset))
                        .map(|()| b.len())
                        .map_err(|e| RpcError::Fs(FsError::from(e)))
                }
            },
            _ => Err(RpcError::Protocol("reply of the wrong kind to a chunk read".into())),
        }
    }

    fn ack(&self) -> u64 {
        let out = self.inner.outstanding.lock().unwrap();
        match out.keys().next() {
            Some(&least) => least.saturating_sub(1),
            None => self.inner.next_seq.load(Ordering::SeqCst) - 1,
        }
    }

    /// Sends one operation and waits for its reply, retransmitting with the
    /// same transaction id until the call's deadline.
    pub async fn call<O: Operation>(&self, op: O) -> Result<O::Reply, RpcError> {
        let seq = self.allocate_sequence();
        let reply = self.call_with_seq(seq, op.into_request()).await;
        self.unhold(seq);
        O::from_reply(reply?).ok_or_else(|| RpcError::Protocol(format!("reply of the wrong kind to {:?}", O::KIND)))
    }

    /// Sends a request under a given sequence number (from
    /// [`Client::allocate_sequence`]). Resending a request under the seq it
    /// was first sent with is how a restarted client finishes a mutation
    /// without running it twice.
    pub async fn call_with_seq(&self, seq: u64, body: Request) -> Result<Reply, RpcError> {
        let inner = &*self.inner;
        inner.retain(seq);
        let _guard = OutstandingGuard(inner, seq);
        let xid = Xid { client: inner.cfg.client_id, seq };
        let frame: Frame = Arc::new(
            frame::encode_message(Message::Call { xid, ack: self.ack(), body })
                .map_err(|e| RpcError::Protocol(e.to_string()))?,
        );
        let started = Instant::now();
        let hard_deadline = started + inner.cfg.busy_limit.max(inner.cfg.call_timeout);
        let mut deadline = started + inner.cfg.call_timeout;
        let mut backoff = Duration::from_millis(50);
        let mut last_err = RpcError::Timeout(inner.cfg.call_timeout);
        while Instant::now() < deadline {
            let conn = match timeout(deadline - Instant::now(), self.connection()).await {
                Err(_) => break,
                Ok(Ok(c)) => c,
                Ok(Err(e @ RpcError::Refused(_))) => return Err(e),
                Ok(Err(e)) => {
                    last_err = e;
                    tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now()))).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let (tx, mut rx) = oneshot::channel();
            conn.pending.lock().unwrap().insert(seq, tx);
            if !self.send_within(&conn, &frame, deadline).await {
                continue;
            }
            // Waits on this connection for as long as the server shows it is
            // alive. A slow call is resent now and then (after 1, 2, 4, 8...
            // answered pings): the server joins a resend to the running
            // execution, and it covers a reply lost on the way. Every resend
            // holds a request slot on the server until the first finishes,
            // hence the backoff.
            let mut probes: u32 = 0;
            loop {
                let wait = inner.cfg.attempt_timeout.min(deadline.saturating_duration_since(Instant::now()));
                match timeout(wait, &mut rx).await {
                    Ok(Ok(result)) => return result.map_err(RpcError::Fs),
                    Ok(Err(_)) => {
                        // The connection died under us; reconnect and resend.
                        last_err = RpcError::Unreachable("connection lost".into());
                        break;
                    }
                    Err(_) => last_err = RpcError::Timeout(inner.cfg.call_timeout),
                }
                if Instant::now() >= hard_deadline {
                    // Busy for longer than anyone should wait: this call
                    // gives up; the connection stays for the others.
                    conn.pending.lock().unwrap().remove(&seq);
                    return match rx.try_recv() {
                        Ok(result) => result.map_err(RpcError::Fs),
                        Err(_) => Err(RpcError::Timeout(inner.cfg.busy_limit)),
                    };
                }
                // Slow, or gone? A server that answers a ping on this
                // connection is working on the call, which gets more time (up
                // to the hard limit). One that does not is dropped, and the
                // call goes to a new connection.
                let wait = inner.cfg.attempt_timeout.min(hard_deadline - Instant::now());
                if self.ping_conn(&conn, wait).await.is_err() {
                    self.abandon(&conn).await;
                    // Out of `pending` first: then no reply can slip past.
                    conn.pending.lock().unwrap().remove(&seq);
                    if let Ok(result) = rx.try_recv() {
                        return result.map_err(RpcError::Fs);
                    }
                    break;
                }
                // Still in `pending`: a reply on its way reaches `rx`.
                if let Ok(result) = rx.try_recv() {
                    return result.map_err(RpcError::Fs);
                }
                deadline = (Instant::now() + inner.cfg.call_timeout).min(hard_deadline);
                probes += 1;
                if probes.is_power_of_two() {
                    tracing::debug!(seq, probes, "no reply yet, resending");
                    if !self.send_within(&conn, &frame, deadline).await {
                        break;
                    }
                }
            }
        }
        Err(match last_err {
            RpcError::Unreachable(m) => RpcError::Unreachable(m),
            _ => RpcError::Timeout(inner.cfg.call_timeout),
        })
    }

    /// Queues a frame on `conn`, giving up (and dropping the connection)
    /// at `deadline`, or after a call timeout if that is later: a dead peer
    /// can leave the outbox full for good, while a slow link only drains it
    /// slowly.
    async fn send_within(&self, conn: &Arc<Conn>, frame: &Frame, deadline: Instant) -> bool {
        let wait = deadline.saturating_duration_since(Instant::now()).max(self.inner.cfg.call_timeout);
        match timeout(wait, conn.outbox.send(frame.clone())).await {
            Ok(Ok(())) => true,
            _ => {
                self.abandon(conn).await;
                false
            }
        }
    }

    /// Gives up on a connection that stopped answering: its reader stops,
    /// every call waiting on it reconnects and resends.
    async fn abandon(&self, conn: &Arc<Conn>) {
        conn.closed.store(true, Ordering::SeqCst);
        conn.kill.notify_one();
        self.drop_connection(conn).await;
    }

    async fn drop_connection(&self, dead: &Arc<Conn>) {
        let mut slot = self.inner.conn.lock().await;
        if matches!(&*slot, Some(c) if c.id == dead.id) {
            *slot = None;
        }
    }

    /// The current connection, or a new one.
    async fn connection(&self) -> Result<Arc<Conn>, RpcError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some(c) = &*slot {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let c = timeout(self.inner.cfg.connect_timeout, self.open())
            .await
            .map_err(|_| RpcError::Unreachable(format!("connect to {} timed out", self.inner.cfg.addr)))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    async fn open(&self) -> Result<Arc<Conn>, RpcError> {
        let cfg = &self.inner.cfg;
        let mut stream =
            TcpStream::connect(&cfg.addr).await.map_err(|e| RpcError::Unreachable(format!("{}: {e}", cfg.addr)))?;
        stream.set_nodelay(true).ok();
        let server = handshake(&mut stream, cfg).await?;
        let id = self.inner.next_conn.fetch_add(1, Ordering::SeqCst);
        tracing::debug!(conn = id, %server, addr = %cfg.addr, "connected");
        let (rd, wr) =
            socket::split(stream).map_err(|e| RpcError::Unreachable(format!("cannot split the socket: {e}")))?;
        let conn = Arc::new(Conn {
            id,
            outbox: Outbox::spawn(wr),
            pending: Arc::new(Mutex::new(HashMap::new())),
            pings: Arc::new(Mutex::new(Vec::new())),
            closed: Arc::new(AtomicBool::new(false)),
            kill: Arc::new(tokio::sync::Notify::new()),
        });
        let (pending, pings, closed) = (conn.pending.clone(), conn.pings.clone(), conn.closed.clone());
        let kill = conn.kill.clone();
        let manual_acks = cfg.manual_break_acks;
        let weak = Arc::downgrade(&self.inner);
        let outbox = conn.outbox.clone();
        let sinks = self.inner.sinks.clone();
        let reader = async move {
            let mut lander = None;
            let emit = |ev: ClientEvent| {
                if let Some(inner) = weak.upgrade() {
                    if let Some(tx) = &*inner.events.lock().unwrap() {
                        let _ = tx.send(ev);
                    }
                }
            };
            // Registered here, on the reader thread's own runtime, so that
            // arriving bytes wake this thread directly.
            let mut registered =
                rd.register().inspect_err(|e| tracing::warn!(conn = id, "cannot watch the socket: {e}"));
            while let Ok(rd) = &mut registered {
                let read = tokio::select! {
                    r = read_message(rd, &sinks, &pending, &mut lander) => r,
                    _ = kill.notified() => break,
                };
                let msg: Message = match read {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e @ frame::FrameError::Malformed(_)) => {
                        tracing::warn!(conn = id, "bad message from server: {e}");
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(conn = id, "connection read failed: {e}");
                        break;
                    }
                };
                match msg {
                    Message::Return { seq, result } => {
                        if let Some(tx) = pending.lock().unwrap().remove(&seq) {
                            let _ = tx.send(result);
                        }
                    }
                    Message::Push(p) => {
                        if let (Push::Break { id, .. }, false) = (&p, manual_acks) {
                            let _ = outbox.send_message(Message::BreakAck { id: *id }).await;
                        }
                        emit(ClientEvent::Push(p));
                    }
                    Message::Pong => {
                        for tx in pings.lock().unwrap().drain(..) {
                            let _ = tx.send(());
                        }
                    }
                    other => {
                        tracing::warn!(conn = id, "unexpected message from server: {other:?}");
                        break;
                    }
                }
            }
            // Waking every waiter makes it reconnect and resend.
            closed.store(true, Ordering::SeqCst);
            pending.lock().unwrap().clear();
            pings.lock().unwrap().clear();
            drop(outbox);
            emit(ClientEvent::Lost { conn: id });
        };
        spawn_reader(id, reader)
            .map_err(|e| RpcError::Unreachable(format!("cannot start a connection reader: {e}")))?;
        if let Some(tx) = &*self.inner.events.lock().unwrap() {
            let _ = tx.send(ClientEvent::Connected { conn: id });
        }
        Ok(conn)
    }
}

/// Runs a connection's reader on a thread of its own. The reader writes
/// chunk payloads to their files as they arrive (see `landing`); page-cache
/// writes block, and on a runtime worker each would first have to hand the
/// worker's other tasks away (`block_in_place`); here a write blocks only
/// this thread. The thread's runtime watches the socket's read half itself
/// (see `socket`). The reader uses no timer today; the runtime has one
/// anyway, so one added later is not a panic.
fn spawn_reader(id: u64, reader: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
    std::thread::Builder::new().name(format!("rpc-reader-{id}")).spawn(move || rt.block_on(reader))?;
    Ok(())
}

/// Reads the next message. A chunk reply whose call named a sink has its
/// payload landed there, and says where it went.
async fn read_message(
    rd: &mut ReadHalf,
    sinks: &Sinks,
    pending: &Pending,
    lander: &mut Option<Lander>,
) -> Result<Option<Message>, FrameError> {
    let Some((mut msg, len)) = frame::read_message_head(rd).await? else { return Ok(None) };
    // Landed once, and only for a call still waiting on this connection: a
    // duplicate reply (to a resent call) or one for a call given up must not
    // write into a file its owner may have moved on from. Those are read
    // and handed on (or dropped) as bytes.
    let sink = match &msg {
        Message::Return { seq, result: Ok(Reply::ReadChunk(_)) } if len > 0 => {
            let waiting = pending.lock().unwrap().contains_key(seq);
            let sink = sinks.lock().unwrap().remove(seq);
            sink.filter(|_| waiting)
        }
        _ => None,
    };
    if lander.is_none() && sink.is_some() {
        // Without a pipe (out of descriptors) the payload is read instead.
        *lander = Lander::new().inspect_err(|e| tracing::warn!("no pipe to land chunks through: {e}")).ok();
    }
    let payload = match (sink, lander.as_mut()) {
        (Some(sink), Some(lander)) => match lander.land(rd, len, &sink).await? {
            Landed::Written => Payload::File(FileSlice { file: sink.file, offset: sink.offset, len }),
            Landed::WriteFailed(e) => {
                if let Message::Return { result, .. } = &mut msg {
                    *result = Err(FsError::from(e));
                }
                return Ok(Some(msg));
            }
        },
        _ => frame::read_payload(rd, len).await?.into(),
    };
    frame::attach_payload(&mut msg, payload)?;
    Ok(Some(msg))
}

/// Hello, challenge, proof, welcome. Returns the server's id.
async fn handshake(stream: &mut TcpStream, cfg: &ClientConfig) -> Result<Uuid, RpcError> {
    let proto = |e: FrameError| match e {
        FrameError::Io(e) => RpcError::Unreachable(e.to_string()),
        FrameError::Truncated => RpcError::Unreachable("server closed the connection during the handshake".into()),
        other => RpcError::Protocol(other.to_string()),
    };
    let nonce = random_bytes::<NONCE_LEN>().to_vec();
    let hello = Hello { magic: MAGIC, version: PROTOCOL_VERSION, client: cfg.client_id, nonce: nonce.clone() };
    frame::write_message(stream, &hello).await.map_err(proto)?;
    let server_nonce = match frame::read_message::<_, Message>(stream).await.map_err(proto)? {
        Message::Challenge { nonce } => nonce,
        Message::Refused { reason } => return Err(RpcError::Refused(reason)),
        other => return Err(RpcError::Protocol(format!("expected a challenge, got {other:?}"))),
    };
    let mac = cfg.key.client_proof(cfg.client_id, &nonce, &server_nonce);
    frame::write_message(stream, &Message::Proof { mac }).await.map_err(proto)?;
    match frame::read_message::<_, Message>(stream).await.map_err(proto)? {
        Message::Welcome { mac, server } => {
            if cfg.key.verify_server(cfg.client_id, &nonce, &server_nonce, &mac) {
                Ok(server)
            } else {
                Err(RpcError::Refused("the server could not prove it holds our key".into()))
            }
        }
        Message::Refused { reason } => Err(RpcError::Refused(reason)),
        other => Err(RpcError::Protocol(format!("expected welcome, got {other:?}"))),
    }
}
