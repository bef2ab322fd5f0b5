# Regenerates signed-vectors.json: python3 signed-vectors.py > signed-vectors.json
# Computes the signed-packet golden vectors with Python's own hmac/hashlib, an implementation
# independent of the Rust code under test.
import hmac, hashlib, json, struct
key = bytes(range(32)); kid = 1
uuid = bytes.fromhex("2e72361924ef37a6166e0b228d1cbbb0")
ts = 1767225600  # 2026-01-01T00:00:00Z
def tag(label, b): return hmac.new(key, label + b, hashlib.sha256).digest()[:16]
def up(cmd, content, nonce, app=1, k=kid, t=ts):
    b = bytes([2, app, cmd]) + uuid + struct.pack(">H", len(content)) + content + bytes([k]) + struct.pack(">II", t, nonce)
    return b + tag(b"ddpush2u", b)
def down(app, cmd, content, nonce, t=ts):
    b = bytes([2, app, cmd]) + struct.pack(">H", len(content)) + content + bytes([kid]) + struct.pack(">II", t, nonce)
    return b + tag(b"ddpush2d", b)
m5 = struct.pack(">Q", 5)
dev = [
  dict(name="heartbeat", app_id=1, nonce=1, hex=up(0x00, b"", 1).hex()),
  dict(name="ack_0x10", app_id=1, nonce=2, hex=up(0x10, b"", 2).hex()),
  dict(name="ack_0x11_mask_5", app_id=1, mask=5, nonce=3, hex=up(0x11, m5, 3).hex()),
  dict(name="ack_0x20", app_id=1, nonce=4, hex=up(0x20, b"", 4).hex()),
]
hb = up(0x00, b"", 1)
flip = bytearray(hb); flip[-1] ^= 1
wrong_key = up(0x00, b"", 5)  # recomputed below with another key
other = bytes([0xff]*32)
b = bytes([2, 1, 0]) + uuid + b"\x00\x00" + bytes([kid]) + struct.pack(">II", ts, 5)
wrong_key = b + hmac.new(other, b"ddpush2u" + b, hashlib.sha256).digest()[:16]
bad = [
  dict(name="tag_bit_flipped", drop="tag", hex=bytes(flip).hex()),
  dict(name="signed_with_another_key", drop="tag", hex=wrong_key.hex()),
  dict(name="key_id_9", drop="unknown_key", hex=up(0x00, b"", 6, k=9).hex()),
  dict(name="truncated_by_one", drop="length", hex=hb[:-1].hex()),
  dict(name="one_trailing_byte", drop="length", hex=(hb + b"\x00").hex()),
  dict(name="heartbeat_with_n1", drop="length", hex=up(0x00, b"\x09", 7).hex()),
  dict(name="cmd_0x30", drop="command", hex=up(0x30, b"", 8).hex()),
  dict(name="ts_61s_early", drop="expired", hex=up(0x00, b"", 9, t=ts-61).hex()),
  dict(name="ts_61s_late", drop="expired", hex=up(0x00, b"", 10, t=ts+61).hex()),
]
ok_drift = [
  dict(name="ts_60s_early", hex=up(0x00, b"", 11, t=ts-60).hex()),
  dict(name="ts_60s_late", hex=up(0x00, b"", 12, t=ts+60).hex()),
]
sn = 0x100
downs = [
  dict(name="0x10", app_id=1, nonce=sn, hex=down(1, 0x10, b"", sn).hex()),
  dict(name="0x11_mask_5", app_id=1, mask=5, nonce=sn+1, hex=down(1, 0x11, m5, sn+1).hex()),
  dict(name="0x20_hello", app_id=1, payload_utf8="hello", nonce=sn+2, hex=down(1, 0x20, b"hello", sn+2).hex()),
  dict(name="heartbeat_reply", app_id=1, nonce=sn+3, hex=down(1, 0x00, b"", sn+3).hex()),
  dict(name="immediate_0x20_hello", app_id=0, payload_utf8="hello", nonce=sn+4, hex=down(0, 0x20, b"hello", sn+4).hex()),
]
out = {
 "about": "Signed-device vectors (docs/PROTOCOL.md section 9), computed with Python's hmac and hashlib modules, independently of the Rust code. Hex strings, no spaces.",
 "uuid": uuid.hex(), "key_id": kid, "key": key.hex(), "ts": ts,
 "mac": "the tag is the first 16 bytes of HMAC-SHA256(key, label || every byte before the tag), where label is the 8 ASCII bytes ddpush2u (device to server) or ddpush2d (server to device)",
 "device_to_server": dev,
 "device_to_server_dropped_at_ts": bad,
 "device_to_server_accepted_drift": ok_drift,
 "server_to_device": downs,
}
print(json.dumps(out, indent=1))
