//! Reading script replies into the core's values; anything unexpected is an error, never a
//! panic.

use ddpush_proto::cluster::{Gen, NodeId, StoredRecord};
use ddpush_proto::{Content, Time};
use redis::{RedisError, Value};

/// Why one operation failed (all of it becomes [`StoreError::Unavailable`] for the core).
#[derive(Debug, thiserror::Error)]
pub(super) enum OpError {
    #[error(transparent)]
    Redis(#[from] RedisError),
    #[error("unexpected reply: {0}")]
    Reply(String),
}

/// Fields of a record in a script reply.
pub(super) const RECORD_LEN: usize = 11;

/// The record hash's fields in reply order (`FIELDS` in `lua/record.lua`).
pub(super) const RECORD_FIELDS: [&str; RECORD_LEN] =
    ["v", "o", "e", "n", "bh", "bl", "pg", "p", "t0", "t1", "t2"];

pub(super) fn array(v: &Value) -> Result<&[Value], OpError> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(OpError::Reply(format!("expected an array, got {other:?}"))),
    }
}

pub(super) fn bytes(v: Option<&Value>) -> Result<&[u8], OpError> {
    match v {
        Some(Value::BulkString(b)) => Ok(b),
        Some(Value::SimpleString(s)) => Ok(s.as_bytes()),
        other => Err(OpError::Reply(format!("expected a string, got {other:?}"))),
    }
}

pub(super) fn text(v: Option<&Value>) -> Result<&str, OpError> {
    std::str::from_utf8(bytes(v)?).map_err(|_| OpError::Reply("not UTF-8".into()))
}

pub(super) fn number(v: Option<&Value>) -> Result<u64, OpError> {
    if let Some(Value::Int(i)) = v {
        return u64::try_from(*i).map_err(|_| OpError::Reply("negative number".into()));
    }
    let t = text(v)?;
    t.parse()
        .map_err(|_| OpError::Reply(format!("not a number: {t:?}")))
}

pub(super) fn opt_number(v: Option<&Value>) -> Result<Option<u64>, OpError> {
    if bytes(v)?.is_empty() {
        Ok(None)
    } else {
        number(v).map(Some)
    }
}

/// A reply `{tag, record...}` with the expected tag.
pub(super) fn single(v: &Value, tag: &str) -> Result<StoredRecord, OpError> {
    let items = array(v)?;
    let got = text(items.first())?;
    if got != tag {
        return Err(OpError::Reply(format!("expected {tag:?}, got {got:?}")));
    }
    record(&items[1..])
}

/// The 11 record fields of a reply (see `lua/record.lua`).
pub(super) fn record(f: &[Value]) -> Result<StoredRecord, OpError> {
    if f.len() < RECORD_LEN {
        return Err(OpError::Reply("short record in reply".into()));
    }
    let owner = text(f.get(1))?;
    let bh = number(f.get(4))?;
    let bl = number(f.get(5))?;
    if bh > u64::from(u32::MAX) || bl > u64::from(u32::MAX) {
        return Err(OpError::Reply("mask half out of range".into()));
    }
    let payload = match opt_number(f.get(6))? {
        None => None,
        Some(g) => Some((
            g as Gen,
            Content::copy_from_slice(bytes(f.get(7))?)
                .map_err(|_| OpError::Reply("payload longer than a length field".into()))?,
        )),
    };
    let t = |i: usize| opt_number(f.get(i)).map(|o| o.map(Time));
    Ok(StoredRecord {
        ver: number(f.first())?,
        owner: (!owner.is_empty()).then(|| NodeId(owner.to_string())),
        epoch: number(f.get(2))?,
        notify: opt_number(f.get(3))?,
        bits: (bh << 32) | bl,
        payload,
        pushed_at: [t(8)?, t(9)?, t(10)?],
    })
}
