//! The server end of the RPC layer: handshake, per-connection receive loop,
//! and the reply cache that makes mutations at-most-once.
//!
//! The in-memory table here catches duplicates of requests that are still
//! running (they wait for the first execution) and of recent mutations. The
//! service's [`Hooks::recorded_reply`] covers the rest: afsd commits each
//! mutation's reply together with the mutation, so a
//! duplicate that arrives after a server restart still gets the original reply.

use super::outbox::{Frame, Outbox};
use super::socket;
use crate::auth::{random_bytes, Key, NONCE_LEN};
use crate::error::FsError;
use crate::fid::Fid;
use crate::frame::{self, FrameError, Hello, Message, MAGIC, PROTOCOL_VERSION};
use crate::proto::{dispatch, CallContext, OpKind, Push, Reply, Request, Service, Xid};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch, Semaphore};
use uuid::Uuid;

/// How long a peer may take over each step of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests one connection may have running at once; more wait in the socket.
const MAX_IN_FLIGHT: usize = 128;
/// Finished mutations remembered in memory per client (sled keeps them all
/// until acknowledged).
const MEMORY_REPLIES_PER_CLIENT: usize = 4096;

/// What the RPC layer needs from the service besides the operations.
pub trait Hooks: Send + Sync + 'static {
    /// A client authenticated; `push` reaches it until it disconnects.
    fn connected(&self, client: Uuid, conn: u64, push: Pusher);
    fn disconnected(&self, client: Uuid, conn: u64);
    /// The durable reply of a mutation already executed, if any.
    fn recorded_reply(&self, xid: &Xid) -> Option<Result<Reply, FsError>>;
    /// The client holds every reply up to `seq`: they may be discarded.
    fn acknowledged(&self, client: Uuid, seq: u64);
    /// Counts one request (duplicates included).
    fn count(&self, _kind: OpKind) {}
    /// Calls of this kind are answered in the connection's reader, in the
    /// order they arrived, instead of in a task of their own. Only for calls
    /// whose handler never waits (no locks held by others, no disk): the
    /// reader reads nothing else meanwhile. A transfer's chunk reads need
    /// it: run in parallel, their replies leave out of order, and the file
    /// is read out of order rather than front to back.
    fn answered_in_order(&self, _kind: OpKind) -> bool {
        false
    }
    /// Awaited after a request ran (and released whatever it held) and
    /// before its reply is sent.
    fn before_reply(&self, _xid: &Xid, _kind: OpKind) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Sends server pushes down one connection.
#[derive(Clone)]
pub struct Pusher {
    outbox: Outbox,
    /// Breaks sent and not yet acknowledged, by id.
    acks: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
    next_id: Arc<AtomicU64>,
}

/// How a break went.
#[derive(Debug, PartialEq, Eq)]
pub enum BreakOutcome {
    Acked,
    /// Sent, but not acknowledged in time.
    Unacked,
    /// The connection is gone.
    Closed,
}

impl Pusher {
    /// Queues a push; false when the connection is gone.
    pub fn push(&self, p: Push) -> impl Future<Output = bool> + Send + 'static {
        let outbox = self.outbox.clone();
        async move {
            match frame::encode_message(Message::Push(p)) {
                Ok(f) => outbox.send(Arc::new(f)).await.is_ok(),
                Err(_) => false,
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.outbox.is_closed()
    }

    /// Sends a break and waits (at most `wait`) for the client to say it
    /// no longer trusts its copies.
    pub fn break_and_wait(
        &self,
        fids: Vec<Fid>,
        wait: Duration,
    ) -> impl Future<Output = BreakOutcome> + Send + 'static {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.acks.lock().unwrap().insert(id, tx);
        let (outbox, acks) = (self.outbox.clone(), self.acks.clone());
        async move {
            let sent = match frame::encode_message(Message::Push(Push::Break { id, fids })) {
                Ok(f) => outbox.send(Arc::new(f)).await.is_ok(),
                Err(_) => false,
            };
            let outcome = if !sent {
                BreakOutcome::Closed
            } else {
                match tokio::time::timeout(wait, rx).await {
                    Ok(Ok(())) => BreakOutcome::Acked,
                    Ok(Err(_)) => BreakOutcome::Closed,
                    Err(_) => BreakOutcome::Unacked,
                }
            };
            acks.lock().unwrap().remove(&id);
            outcome
        }
    }

    fn acknowledge(&self, id: u64) {
        if let Some(tx) = self.acks.lock().unwrap().remove(&id) {
            let _ = tx.send(());
        }
    }
}

type Shared = Arc<Result<Reply, FsError>>;

enum Slot {
    Running(watch::Receiver<Option<Shared>>),
    Done(Shared),
}

#[derive(Default)]
struct ClientReplies {
    acked: u64,
    slots: BTreeMap<u64, Slot>,
}

pub struct RpcServer<S> {
    service: Arc<S>,
    key: Key,
    server_id: Uuid,
    next_conn: AtomicU64,
    replies: Mutex<HashMap<Uuid, ClientReplies>>,
}

/// What to do with an incoming call, decided under the table lock.
enum Plan {
    Run(watch::Sender<Option<Shared>>),
    Wait(watch::Receiver<Option<Shared>>),
    Answer(Shared),
}

impl<S: Service + Hooks> RpcServer<S> {
    pub fn new(service: Arc<S>, key: Key, server_id: Uuid) -> Arc<Self> {
        Arc::new(RpcServer {
            service,
            key,
            server_id,
            next_conn: AtomicU64::new(1),
            replies: Mutex::new(HashMap::new()),
        })
    }

    pub fn service(&self) -> &Arc<S> {
        &self.service
    }

    /// Accepts connections until `shutdown` turns true.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(10);
        loop {
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        backoff = Duration::from_millis(10);
                        let this = self.clone();
                        tokio::spawn(async move {
                            if let Err(e) = this.connection(stream).await {
                                tracing::info!(%peer, "connection ended: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}; backing off {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            }
        }
    }

    async fn connection(self: Arc<Self>, mut stream: TcpStream) -> Result<(), String> {
        stream.set_nodelay(true).ok();
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let client = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream))
            .await
            .map_err(|_| "handshake timed out".to_string())??;
        let conn = self.next_conn.fetch_add(1, Ordering::SeqCst);
        tracing::info!(%client, conn, %peer, "client connected");
        let (rd, wr) = socket::split(stream).map_err(|e| format!("cannot split the socket: {e}"))?;
        let mut rd = rd.register().map_err(|e| format!("cannot watch the socket: {e}"))?;
        let outbox = Outbox::spawn(wr);
        let pusher = Pusher {
            outbox: outbox.clone(),
            acks: Arc::new(Mutex::new(HashMap::new())),
            next_id: Arc::new(AtomicU64::new(1)),
        };
        self.service.connected(client, conn, pusher.clone());
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let result = loop {
            let msg = match frame::read_message_frame(&mut rd).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => break Ok(()),
                Err(e @ FrameError::Malformed(_)) => Err(e),
                Err(e) => break Err(format!("read failed: {e}")),
            };
            match msg {
                Ok(Message::Call { xid, ack, body }) => {
                    if xid.client != client {
                        break Err(format!("request claims client {} on a connection of {client}", xid.client));
                    }
                    let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
                    if self.service.answered_in_order(body.kind()) {
                        self.call(conn, xid, ack, body, &outbox).await;
                        drop(permit);
                        continue;
                    }
                    let (this, outbox) = (self.clone(), outbox.clone());
                    tokio::spawn(async move {
                        this.call(conn, xid, ack, body, &outbox).await;
                        drop(permit);
                    });
                }
                Ok(Message::BreakAck { id }) => pusher.acknowledge(id),
                Ok(Message::Ping) => {
                    let _ = outbox.send_message(Message::Pong).await;
                }
                Ok(other) => break Err(format!("unexpected message {other:?}")),
                Err(e) => break Err(format!("malformed request: {e}")),
            }
        };
        self.service.disconnected(client, conn);
        tracing::info!(%client, conn, "client disconnected");
        result
    }

    async fn handshake(&self, stream: &mut TcpStream) -> Result<Uuid, String> {
        let hello: Hello = match frame::read_frame(stream).await {
            Ok(Some(body)) => match frame::decode(&body) {
                Ok(h) => h,
                Err(_) => {
                    refuse(stream, "malformed hello: not an AFS client or an incompatible protocol").await;
                    return Err("malformed hello".into());
                }
            },
            Ok(None) => return Err("closed before hello".into()),
            Err(FrameError::TooLarge(n)) => {
                refuse(stream, &format!("hello of {n} bytes is too large")).await;
                return Err("oversize hello".into());
            }
            Err(e) => return Err(format!("reading hello: {e}")),
        };
        if hello.magic != MAGIC {
            refuse(stream, "bad protocol magic: not an AFS client").await;
            return Err(format!("bad magic {:#x}", hello.magic));
        }
        if hello.version != PROTOCOL_VERSION {
            let reason = format!(
                "protocol version {} is not supported: this server speaks version {PROTOCOL_VERSION}",
                hello.version
            );
            refuse(stream, &reason).await;
            return Err(reason);
        }
        let nonce = random_bytes::<NONCE_LEN>().to_vec();
        frame::write_message(stream, &Message::Challenge { nonce: nonce.clone() }).await.map_err(|e| e.to_string())?;
        let mac = match frame::read_message::<_, Message>(stream).await {
            Ok(Message::Proof { mac }) => mac,
            Ok(_) | Err(FrameError::Malformed(_)) => {
                refuse(stream, "expected an authentication proof").await;
                return Err("no proof".into());
            }
            Err(e) => return Err(format!("reading proof: {e}")),
        };
        if !self.key.verify_client(hello.client, &hello.nonce, &nonce, &mac) {
            let reason = "authentication failed: the client does not hold this server's key";
            refuse(stream, reason).await;
            tracing::warn!(client = %hello.client, "{reason}");
            return Err(reason.into());
        }
        let mac = self.key.server_proof(hello.client, &hello.nonce, &nonce);
        frame::write_message(stream, &Message::Welcome { mac, server: self.server_id })
            .await
            .map_err(|e| e.to_string())?;
        Ok(hello.client)
    }

    /// Runs one call through the reply cache and sends its reply.
    async fn call(&self, conn: u64, xid: Xid, ack: u64, body: Request, outbox: &Outbox) {
        let kind = body.kind();
        self.service.count(kind);
        // An ack covers only replies the client can have: below this request.
        let acked = self.note_ack(xid.client, ack.min(xid.seq.saturating_sub(1)));
        if let Some(upto) = acked {
            self.service.acknowledged(xid.client, upto);
        }
        let result = match self.plan(&xid) {
            Plan::Answer(r) => r,
            Plan::Wait(mut rx) => loop {
                if let Some(r) = rx.borrow_and_update().clone() {
                    break r;
                }
                if rx.changed().await.is_err() {
                    // The first execution was abandoned; the client will retry.
                    return;
                }
            },
            Plan::Run(tx) => {
                // If the execution panics, the slot must not wait forever.
                let mut guard = RunningGuard { server: self, xid, armed: true };
                let recorded = if kind.mutates() { self.service.recorded_reply(&xid) } else { None };
                let result: Shared = match recorded {
                    Some(r) => Arc::new(r),
                    None => {
                        let cx = CallContext { xid, conn };
                        Arc::new(dispatch(&*self.service, &cx, body).await)
                    }
                };
                guard.armed = false;
                self.finish(&xid, kind, &result);
                let _ = tx.send(Some(result.clone()));
                self.service.before_reply(&xid, kind).await;
                result
            }
        };
        // The client can only show EIO for it: the cause goes to the log.
        if let Err(FsError::Io(why)) = &*result {
            tracing::warn!(seq = xid.seq, op = kind.name(), "answering an I/O error: {why}");
        }
        // Cheap: bulk bytes are shared, not copied.
        let msg = Message::Return { seq: xid.seq, result: (*result).clone() };
        match frame::encode_message(msg) {
            Ok(f) => {
                let _ = outbox.send(Frame::new(f)).await;
            }
            Err(e) => tracing::error!(seq = xid.seq, "cannot encode reply: {e}"),
        }
    }

    /// Records a cumulative ack; returns it when it moved forward.
    fn note_ack(&self, client: Uuid, ack: u64) -> Option<u64> {
        let mut table = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        let t = table.entry(client).or_default();
        if ack <= t.acked {
            return None;
        }
        t.acked = ack;
        let keep = t.slots.split_off(&(ack.saturating_add(1)));
        let old = std::mem::replace(&mut t.slots, keep);
        // Running entries stay until they finish, acked or not.
        for (seq, slot) in old {
            if let Slot::Running(_) = slot {
                t.slots.insert(seq, slot);
            }
        }
        Some(ack)
    }

    fn plan(&self, xid: &Xid) -> Plan {
        let mut table = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        let t = table.entry(xid.client).or_default();
        match t.slots.get(&xid.seq) {
            Some(Slot::Running(rx)) => return Plan::Wait(rx.clone()),
            Some(Slot::Done(r)) => return Plan::Answer(r.clone()),
            None => {}
        }
        if xid.seq <= t.acked {
            // The client said it has this reply, so it is gone: a stale
            // duplicate, or a client that lost track of it in a crash. It is
            // not run again, and it is answered: a client that still waits
            // would otherwise wait as long as the server answers its pings.
            return Plan::Answer(Arc::new(Err(FsError::Invalid(acknowledged_already(xid.seq)))));
        }
        let (tx, rx) = watch::channel(None);
        t.slots.insert(xid.seq, Slot::Running(rx));
        Plan::Run(tx)
    }

    fn finish(&self, xid: &Xid, kind: OpKind, result: &Shared) {
        let mut table = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        let t = table.entry(xid.client).or_default();
        if kind.mutates() && xid.seq > t.acked {
            t.slots.insert(xid.seq, Slot::Done(result.clone()));
            // Bound memory: the oldest finished replies go first (the
            // durable record still answers their duplicates).
            while t.slots.len() > MEMORY_REPLIES_PER_CLIENT {
                let oldest_done = t.slots.iter().find(|(_, s)| matches!(s, Slot::Done(_))).map(|(k, _)| *k);
                match oldest_done {
                    Some(k) => {
                        t.slots.remove(&k);
                    }
                    None => break,
                }
            }
        } else {
            t.slots.remove(&xid.seq);
        }
    }
}

/// The error a call gets when its transaction id was acknowledged already.
pub fn acknowledged_already(seq: u64) -> String {
    format!("transaction {seq} was answered and acknowledged before; it is not run again")
}

/// Whether an error is [`acknowledged_already`]'s.
pub fn is_acknowledged_already(e: &FsError) -> bool {
    matches!(e, FsError::Invalid(m) if m.starts_with("transaction ") && m.ends_with("it is not run again"))
}

/// Removes a running slot whose execution unwound.
struct RunningGuard<'a, S: Service + Hooks> {
    server: &'a RpcServer<S>,
    xid: Xid,
    armed: bool,
}

impl<S: Service + Hooks> Drop for RunningGuard<'_, S> {
    fn drop(&mut self) {
        if self.armed {
            let mut table = self.server.replies.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = table.get_mut(&self.xid.client) {
                t.slots.remove(&self.xid.seq);
            }
        }
    }
}

async fn refuse(stream: &mut TcpStream, reason: &str) {
    let _ = frame::write_message(stream, &Message::Refused { reason: reason.to_string() }).await;
}
