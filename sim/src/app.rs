//! A simulated app server: one persistent connection to 9999 driven by the core's
//! [`PushSession`], the same pipeline the `ddpush` client uses (replies matched in order; when
//! a reply is late or the connection breaks it reconnects and re-sends every unanswered request
//! in the original order, so last-wins still ends at its last push).
//!
//! The app never pushes a payload over the server's maximum, so it sets `max_attempts` to
//! "until answered": a closed connection here is always a fault of the network or the server,
//! and the scenario checks that every push gets its verdict.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use ddpush_proto::session::{PushConfig, PushOutcome, PushSession};
use ddpush_proto::{PushMsg, PushRequest, Time};
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

/// A pushed request: its plan index and when it was first handed to the session.
struct Sent {
    plan: usize,
    sent_at: u64,
}

fn request(sh: &Shared, p: &Planned) -> PushRequest {
    PushRequest {
        app_id: 1,
        uuid: sh.devices[p.device].borrow().uuid,
        msg: p.msg.clone(),
    }
}

fn reply_byte(o: PushOutcome) -> Option<u8> {
    match o {
        PushOutcome::Accepted => Some(0x00),
        PushOutcome::Rejected => Some(0x01),
        PushOutcome::Failed => Some(0xFF),
        _ => None,
    }
}

/// Logs the verdicts the session has; returns how many were `Closed` (no reply byte).
fn record(sh: &Shared, plan: &[Planned], sent: &[Sent], s: &mut PushSession, at: u64) -> usize {
    let mut closed = 0;
    while let Some((id, o)) = s.poll_outcome() {
        let Some(f) = usize::try_from(id.0).ok().and_then(|i| sent.get(i)) else {
            continue;
        };
        let p = &plan[f.plan];
        let Some(b) = reply_byte(o) else {
            closed += 1;
            continue;
        };
        sh.trace.borrow_mut().add(b'a', at, &[b]);
        sh.app.borrow_mut().answered.push(Answered {
            device: p.device,
            msg: p.msg.clone(),
            sent_at: f.sent_at,
            replied_at: at,
            reply: b,
        });
    }
    closed
}

/// Runs until every planned push is answered or `end` passes.
pub async fn run(
    sh: Rc<Shared>,
    plan: Vec<Planned>,
    server: SocketAddr,
    end: u64,
) -> turmoil::Result {
    let mut session = PushSession::new(PushConfig {
        window: WINDOW,
        reply_timeout: REPLY_TIMEOUT,
        max_attempts: u32::MAX,
        ..PushConfig::default()
    });
    // Indexed by request id: ids are 0, 1, 2... in push order.
    let mut sent: Vec<Sent> = Vec::new();
    let mut closed = 0usize;
    let mut first = true;
    let mut out = Vec::new();
    while now_ms() < end && (sent.len() < plan.len() || session.unanswered() > 0) {
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
        session.handle_connected(Time(now_ms()));
        let mut ok = true;
        let mut buf = [0u8; 64];
        while ok && (sent.len() < plan.len() || session.unanswered() > 0) && now_ms() < end {
            out.clear();
            let _ = session.poll_transmit(Time(now_ms()), &mut out);
            if !out.is_empty() {
                ok = wr.write_all(&out).await.is_ok();
                continue;
            }
            let next = sent.len();
            let send_at = if next < plan.len() && session.unanswered() < WINDOW {
                plan[next].at
            } else {
                u64::MAX
            };
            let deadline = session.poll_timeout().map_or(u64::MAX, |t| t.as_millis());
            let wake = send_at.min(deadline).min(end);
            tokio::select! {
                biased;
                r = rd.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => { ok = false; continue; }
                        Ok(n) => n,
                    };
                    let at = now_ms();
                    if session.handle_replies(Time(at), &buf[..n]).is_err() {
                        ok = false;
                    }
                    closed += record(&sh, &plan, &sent, &mut session, at);
                }
                _ = tokio::time::sleep(Duration::from_millis(wake.saturating_sub(now_ms()))) => {
                    let now = now_ms();
                    if session.handle_timeout(Time(now)) {
                        ok = false; // the reply is late: the session gave up on this connection
                    } else if now >= send_at {
                        session.push(request(&sh, &plan[next]));
                        sent.push(Sent { plan: next, sent_at: now });
                    }
                }
            }
        }
        if !ok {
            session.handle_closed(Time(now_ms()));
            closed += record(&sh, &plan, &sent, &mut session, now_ms());
            sh.app.borrow_mut().reconnects.push(now_ms());
        }
    }
    sh.app.borrow_mut().unanswered = session.unanswered() + closed + (plan.len() - sent.len());
    Ok(())
}
