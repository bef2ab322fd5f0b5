//! Byte-exact checks against `tests/data/golden-vectors.json` (docs/PROTOCOL.md section 7).

mod common;

use common::*;
use ddpush_proto::upstream::{read_node_status, write_node_status};
use ddpush_proto::{
    Config, DeviceMsg, DevicePacket, Event, Port, PushMsg, ReplyPolicy, Time, Uuid,
};

fn s<'a>(v: &'a serde_json::Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("golden field {k} missing"))
}

fn rows<'a>(v: &'a serde_json::Value, k: &str) -> &'a Vec<serde_json::Value> {
    v[k].as_array()
        .unwrap_or_else(|| panic!("golden array {k} missing"))
}

fn row<'a>(v: &'a serde_json::Value, k: &str, name: &str) -> &'a serde_json::Value {
    rows(v, k)
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("golden row {k}/{name} missing"))
}

#[test]
fn golden_uuid_matches_the_contract() {
    let g = golden();
    assert_eq!(s(&g, "uuid"), GOLDEN_UUID);
}

#[test]
fn device_vectors_decode_and_reencode_byte_for_byte() {
    let g = golden();
    let uuid = golden_uuid();
    let list = rows(&g, "device_to_server");
    assert_eq!(list.len(), 4);
    for r in list {
        let bytes = unhex(s(r, "hex"));
        let p = DevicePacket::decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: does not decode: {e}", r["name"]));
        let want = match s(r, "name") {
            "heartbeat" => DeviceMsg::Heartbeat,
            "ack_0x10" => DeviceMsg::AckNotify,
            "ack_0x11_mask_5" => DeviceMsg::AckBits(r["mask"].as_u64().unwrap()),
            "ack_0x20" => DeviceMsg::AckPayload,
            other => panic!("unexpected vector {other}"),
        };
        assert_eq!(
            p,
            DevicePacket {
                app_id: r["app_id"].as_u64().unwrap() as u8,
                uuid,
                msg: want
            }
        );
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(hex::encode(&out), s(r, "hex"), "{}", r["name"]);
        assert_eq!(p.encoded_len(), bytes.len());
    }
}

/// A client that heartbeats (so it is online) and then gets each push at once, appId 0.
#[test]
fn immediate_push_vectors() {
    let g = golden();
    let uuid = golden_uuid();
    let dev = addr(1, 40_000);
    let mut h = default_harness();
    h.heartbeat(dev, 1, uuid);
    assert!(h.take_transmits().is_empty(), "policy never: no reply");
    let pushes = [
        ("0x10", PushMsg::Notify),
        ("0x11_mask_5", PushMsg::Bits(5)),
        ("0x20_hello", payload(b"hello")),
    ];
    for (name, msg) in pushes {
        assert_eq!(h.push(uuid, msg).byte(), 0x00);
        let want = unhex(s(row(&g, "server_to_device_immediate", name), "hex"));
        assert_eq!(h.take_udp(dev), vec![want], "{name}");
        assert!(h.take_transmits().is_empty());
    }
}

fn pushed_offline(h: &mut ddpush_proto::testing::Harness, uuid: Uuid) {
    for msg in [PushMsg::Notify, PushMsg::Bits(5), payload(b"hello")] {
        assert_eq!(h.push(uuid, msg).byte(), 0x00);
    }
    assert!(h.take_transmits().is_empty(), "offline: nothing sent");
}

#[test]
fn heartbeat_answer_vectors_over_udp() {
    let g = golden();
    let uuid = golden_uuid();
    let dev = addr(1, 40_000);
    let mut h = default_harness();
    pushed_offline(&mut h, uuid);
    h.heartbeat(dev, 1, uuid);
    let want: Vec<Vec<u8>> = ["0x10", "0x11_mask_5", "0x20_hello"]
        .iter()
        .map(|n| unhex(s(row(&g, "server_to_device_on_heartbeat_app_1", n), "hex")))
        .collect();
    assert_eq!(h.take_udp(dev), want);
    assert!(h.take_transmits().is_empty());
}

#[test]
fn heartbeat_answer_vectors_back_to_back_on_tcp() {
    let g = golden();
    let uuid = golden_uuid();
    let mut h = default_harness();
    pushed_offline(&mut h, uuid);
    let conn = h.tcp_open(Port::Device, addr(1, 40_001)).unwrap();
    h.tcp_data(
        conn,
        &unhex(s(&row(&g, "device_to_server", "heartbeat").clone(), "hex")),
    );
    assert_eq!(
        hex::encode(h.take_tcp(conn)),
        s(&g, "tcp_stream_on_heartbeat_app_1")
    );
    assert!(h.take_transmits().is_empty(), "nothing over UDP");
}

#[test]
fn heartbeat_reply_vector_under_policy_always() {
    let g = golden();
    let dev = addr(1, 40_000);
    let mut h = harness(Config {
        reply_policy: ReplyPolicy::Always,
        ..Config::default()
    });
    h.udp(
        dev,
        &unhex(s(row(&g, "device_to_server", "heartbeat"), "hex")),
    );
    let want = unhex(s(
        row(&g, "server_to_device_on_heartbeat_app_1", "heartbeat_reply"),
        "hex",
    ));
    assert_eq!(h.take_udp(dev), vec![want]);
}

#[test]
fn push_request_rows_get_their_reply_byte_over_tcp() {
    let g = golden();
    let list = rows(&g, "push_requests");
    assert_eq!(list.len(), 12);
    let mut all = Vec::new();
    let mut all_replies = Vec::new();
    for r in list {
        let name = s(r, "name");
        let req = unhex(s(r, "hex"));
        let mut h = default_harness();
        let conn = h.tcp_open(Port::Push, addr(9, 50_000)).unwrap();
        h.tcp_data(conn, &req);
        match r["reply"].as_str() {
            Some(reply) => {
                assert_eq!(hex::encode(h.take_tcp(conn)), reply, "{name}");
                assert!(h.take_closes().is_empty(), "{name}: stays open");
                all.extend_from_slice(&req);
                all_replies.extend(unhex(reply));
            }
            None => {
                assert_eq!(name, "0x20_n501_header");
                assert!(h.take_tcp(conn).is_empty(), "N=501: no reply byte");
                assert_eq!(h.take_closes(), vec![conn], "N=501: closed at the header");
                assert!(h.events.contains(&Event::Closed {
                    conn,
                    reason: ddpush_proto::CloseReason::Framing
                }));
                assert_eq!(h.node.len(), 0, "nothing stored");
            }
        }
        assert!(h.take_transmits().is_empty(), "{name}: nothing else sent");
    }
    // The same requests pipelined on one connection, in one write and byte by byte, are
    // answered in order.
    for split in [all.len(), 1] {
        let mut h = default_harness();
        let conn = h.tcp_open(Port::Push, addr(9, 50_000)).unwrap();
        for chunk in all.chunks(split) {
            h.tcp_data(conn, chunk);
        }
        assert_eq!(h.take_tcp(conn), all_replies, "split {split}");
        assert!(h.take_closes().is_empty());
    }
}

/// PROTOCOL.md 7, "Observed sequence (offline client)", with realistic device timing.
#[test]
fn offline_sequence_exactly() {
    let g = golden();
    let seq = &g["offline_sequence"];
    let uuid = golden_uuid();
    let dev = addr(1, 40_000);
    let mut h = default_harness();
    let pushes: Vec<PushMsg> = rows(seq, "pushes")
        .iter()
        .map(|p| {
            let p = p.as_str().unwrap();
            match p.split_once(':') {
                None if p == "0x10" => PushMsg::Notify,
                Some(("0x11", b)) => PushMsg::Bits(b.parse().unwrap()),
                Some(("0x20", t)) => payload(t.as_bytes()),
                _ => panic!("unexpected push {p}"),
            }
        })
        .collect();
    assert_eq!(pushes.len(), 5);
    for p in pushes {
        assert_eq!(h.push(uuid, p).byte(), 0x00);
        assert!(
            h.take_transmits().is_empty(),
            "client never seen: nothing sent"
        );
        h.advance(secs(1));
    }
    let expect = |k: &str| -> Vec<Vec<u8>> {
        rows(seq, k)
            .iter()
            .map(|x| unhex(x.as_str().unwrap()))
            .collect()
    };

    h.advance(secs(5));
    h.heartbeat(dev, 7, uuid);
    assert_eq!(h.take_udp(dev), expect("first_heartbeat_replies"));

    // The device acks bit 1 only (as in the capture) half a second later.
    h.advance(millis(500));
    h.ack(dev, 7, uuid, DeviceMsg::AckBits(1));
    assert!(h.take_transmits().is_empty());

    h.advance(secs(50));
    h.heartbeat(dev, 7, uuid);
    assert_eq!(
        h.take_udp(dev),
        expect("after_ack_0x11_mask_1_next_heartbeat")
    );

    h.advance(millis(300));
    h.take_events();
    for a in [
        DeviceMsg::AckNotify,
        DeviceMsg::AckBits(4),
        DeviceMsg::AckPayload,
    ] {
        h.ack(dev, 7, uuid, a);
    }
    let cleared: Vec<bool> = h
        .take_events()
        .iter()
        .filter_map(|e| match e {
            Event::Acked { cleared, .. } => Some(*cleared),
            _ => None,
        })
        .collect();
    assert_eq!(cleared, vec![true, true, true]);

    h.advance(secs(50));
    h.heartbeat(dev, 7, uuid);
    assert_eq!(
        h.take_udp(dev),
        expect("after_acks_of_everything_next_heartbeat")
    );
    assert!(h.take_transmits().is_empty());
}

/// The example record: uuid "a1b08cc2...", no payload, flag 0, mask 0. Checked field by field.
#[test]
fn node_status_example_parses_and_reencodes() {
    let g = golden();
    let hexs = s(&g["node_status_record_example"], "hex");
    let bytes = unhex(hexs);
    assert_eq!(bytes.len(), 77);
    // By hand: 32 ASCII hex digits, then the fields of PROTOCOL.md 5.
    assert_eq!(&bytes[..32], b"a1b08cc23373ccc669456c34517e59e8");
    let last_hb = 0x0000_01a2_1050_180b_u64;
    let t10 = 0x0000_01a2_1050_08c8_i64;
    let t11 = 0x0000_01a2_1050_0921_i64;
    assert_eq!(bytes[40], 0, "0x10 flag");
    assert_eq!(&bytes[49..57], &[0; 8], "mask");
    assert_eq!(&bytes[65..69], &[0; 4], "no payload");
    assert_eq!(&bytes[69..77], &[0xff; 8], "t20 is -1 when L = 0");

    let recs = read_node_status(&bytes).unwrap();
    assert_eq!(recs.len(), 1);
    let r = &recs[0];
    assert_eq!(
        r.uuid,
        Uuid::from_hex("a1b08cc23373ccc669456c34517e59e8").unwrap()
    );
    assert_eq!(r.last_heartbeat, Some(Time::from_millis(last_hb)));
    assert_eq!(r.last_active, Time::from_millis(last_hb));
    assert!(!r.notify);
    assert_eq!(r.bits, 0);
    assert_eq!(r.payload, None);
    assert_eq!(
        r.last_push, None,
        "nothing pending, so no push time matters"
    );
    assert_eq!(r.addr, None);

    // The example keeps the times of a 0x10 and a 0x11 that were pushed and acked since.
    // RecordState keeps one push time for pending items only, so the writer emits -1 there;
    // every other byte is reproduced exactly.
    let mut out = Vec::new();
    write_node_status(&recs, &mut out);
    let mut expected = bytes.clone();
    assert_eq!(&expected[41..49], &t10.to_be_bytes());
    assert_eq!(&expected[57..65], &t11.to_be_bytes());
    expected[41..49].copy_from_slice(&(-1i64).to_be_bytes());
    expected[57..65].copy_from_slice(&(-1i64).to_be_bytes());
    assert_eq!(hex::encode(&out), hex::encode(&expected));
    // And what the writer produces is a fixed point: read + write reproduces it byte for byte.
    let mut again = Vec::new();
    write_node_status(&read_node_status(&out).unwrap(), &mut again);
    assert_eq!(again, out);
}
