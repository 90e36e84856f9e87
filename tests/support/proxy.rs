//! A fault-injecting TCP proxy between a client and afsd.
//!
//! It forwards bytes both ways, parsing the server's frames so it can drop
//! or delay replies on request (to exercise retransmission, and a slow
//! server that is still alive) and cut every connection (to exercise
//! reconnection).

use common::frame::{self, Message};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    drop_replies: Arc<AtomicUsize>,
    pub dropped: Arc<AtomicUsize>,
    delay_replies: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicUsize>,
    cut: watch::Sender<u64>,
    refuse: Arc<AtomicBool>,
    silent: Arc<AtomicBool>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drop_replies = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let refuse = Arc::new(AtomicBool::new(false));
        let delay_replies = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicUsize::new(0));
        let (cut, cut_rx) = watch::channel(0u64);
        let (d, dd, r) = (drop_replies.clone(), dropped.clone(), refuse.clone());
        let (dl, dlms) = (delay_replies.clone(), delay_ms.clone());
        let silent = Arc::new(AtomicBool::new(false));
        let quiet = silent.clone();
        tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else { return };
                if r.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect(&upstream).await else { continue };
                let (d, dd, mut cut_rx) = (d.clone(), dd.clone(), cut_rx.clone());
                let (dl, dlms, quiet) = (dl.clone(), dlms.clone(), quiet.clone());
                tokio::spawn(async move {
                    let (mut dr, mut dw) = down.into_split();
                    // Frames to the client go through one writer, so a delayed
                    // reply lets the frames behind it (pongs) pass.
                    let (to_client, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
                    let writer = async {
                        while let Some(f) = outgoing.recv().await {
                            if dw.write_all(&f).await.is_err() {
                                break;
                            }
                        }
                    };
                    let (mut ur, mut uw) = up.into_split();
                    let c2s = async {
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match dr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if uw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let s2c = async {
                        loop {
                            let body = match frame::read_frame(&mut ur).await {
                                Ok(Some(b)) => b,
                                _ => break,
                            };
                            // Handshake frames are plain; later ones start with the body length.
                            let split = body
                                .get(..4)
                                .map(|l| u32::from_be_bytes(l.try_into().unwrap()) as usize)
                                .and_then(|l| body.get(4..4 + l));
                            let is_return = [Some(&body[..]), split]
                                .into_iter()
                                .flatten()
                                .any(|b| matches!(frame::decode::<Message>(b), Ok(Message::Return { .. })));
                            if quiet.load(Ordering::SeqCst) {
                                continue;
                            }
                            if is_return
                                && d.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
                            {
                                dd.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                            let mut f = (body.len() as u32).to_be_bytes().to_vec();
                            f.extend_from_slice(&body);
                            if is_return
                                && dl.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
                            {
                                let (tx, wait) = (to_client.clone(), dlms.load(Ordering::SeqCst) as u64);
                                tokio::spawn(async move {
                                    tokio::time::sleep(Duration::from_millis(wait)).await;
                                    let _ = tx.send(f);
                                });
                                continue;
                            }
                            if to_client.send(f).is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = c2s => {}
                        _ = s2c => {}
                        _ = writer => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { addr, drop_replies, dropped, delay_replies, delay_ms, cut, refuse, silent }
    }

    /// Holds back the next `n` replies the server sends for `by`; other
    /// frames (pongs, breaks) pass meanwhile, as from a busy server.
    pub fn delay_next_replies(&self, n: usize, by: Duration) {
        self.delay_ms.store(by.as_millis() as usize, Ordering::SeqCst);
        self.delay_replies.store(n, Ordering::SeqCst);
    }

    /// Drops the next `n` replies the server sends.
    pub fn drop_next_replies(&self, n: usize) {
        self.drop_replies.store(n, Ordering::SeqCst);
    }

    /// Closes every connection going through the proxy.
    pub fn cut_all(&self) {
        self.cut.send_modify(|v| *v += 1);
    }

    /// While set, nothing the server sends reaches the client (a hung
    /// server, or a link that lost its way back), and connections stay up.
    pub fn silence(&self, on: bool) {
        self.silent.store(on, Ordering::SeqCst);
    }

    /// While set, new connections are closed at once.
    pub fn refuse_new(&self, on: bool) {
        self.refuse.store(on, Ordering::SeqCst);
    }
}
