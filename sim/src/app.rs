//! A simulated app server: one persistent connection to 9999, pipelined push requests answered
//! in order, and the reconnect logic a real pusher needs: when a reply is late or the connection
//! breaks, it reconnects and re-sends every unanswered request in the original order (so
//! last-wins still ends at its last push).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::{PushMsg, PushRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::TcpStream;

use crate::world::{now_ms, Answered, Shared};

/// One planned push.
#[derive(Clone, Debug)]
pub struct Planned {
    /// When to send it (ms).
    pub at: u64,
    /// Target device index.
    pub device: usize,
    /// The message.
    pub msg: PushMsg,
}

/// Requests in flight on one connection.
const WINDOW: usize = 32;
/// A reply later than this abandons the connection.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_secs(1);

struct Inflight {
    plan: usize,
    sent_at: u64,
}

fn encode(sh: &Shared, p: &Planned) -> Vec<u8> {
    PushRequest {
        app_id: 1,
        uuid: sh.devices[p.device].borrow().uuid,
        msg: p.msg.clone(),
    }
    .to_vec()
}

/// Runs until every planned push is answered or `end` passes.
pub async fn run(
    sh: Rc<Shared>,
    plan: Vec<Planned>,
    server: SocketAddr,
    end: u64,
) -> turmoil::Result {
    let mut next = 0usize;
    let mut unanswered: VecDeque<Inflight> = VecDeque::new();
    let mut first = true;
    while now_ms() < end && (next < plan.len() || !unanswered.is_empty()) {
        if !first {
            tokio::time::sleep(RETRY).await;
        }
        first = false;
        let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server)).await
        else {
            continue;
        };
        sh.app.borrow_mut().connects += 1;
        let (mut rd, mut wr) = s.into_split();
        let mut ok = true;
        for f in &unanswered {
            ok &= wr.write_all(&encode(&sh, &plan[f.plan])).await.is_ok();
        }
        let mut waiting_since = now_ms();
        let mut buf = [0u8; 64];
        while ok && (next < plan.len() || !unanswered.is_empty()) && now_ms() < end {
            let send_at = if next < plan.len() && unanswered.len() < WINDOW {
                plan[next].at
            } else {
                u64::MAX
            };
            let deadline = if unanswered.is_empty() {
                u64::MAX
            } else {
                waiting_since + REPLY_TIMEOUT.as_millis() as u64
            };
            let wake = send_at.min(deadline).min(end);
            tokio::select! {
                biased;
                r = rd.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => { ok = false; continue; }
                        Ok(n) => n,
                    };
                    let at = now_ms();
                    waiting_since = at;
                    for &b in &buf[..n] {
                        let Some(f) = unanswered.pop_front() else {
                            ok = false;
                            break;
                        };
                        sh.trace.borrow_mut().add(b'a', at, &[b]);
                        let p = &plan[f.plan];
                        sh.app.borrow_mut().answered.push(Answered {
                            device: p.device,
                            msg: p.msg.clone(),
                            sent_at: f.sent_at,
                            replied_at: at,
                            reply: b,
                        });
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(wake.saturating_sub(now_ms()))) => {
                    let now = now_ms();
                    if now >= deadline {
                        ok = false; // the reply is late: abandon this connection
                    } else if now >= send_at {
                        if unanswered.is_empty() {
                            waiting_since = now;
                        }
                        ok = wr.write_all(&encode(&sh, &plan[next])).await.is_ok();
                        unanswered.push_back(Inflight { plan: next, sent_at: now });
                        next += 1;
                    }
                }
            }
        }
        if !ok {
            sh.app.borrow_mut().reconnects += 1;
        }
    }
    sh.app.borrow_mut().unanswered = unanswered.len() + (plan.len() - next);
    Ok(())
}
