#!/usr/bin/env python3
"""Writes a `node_ops` input from a readable operation list (for regressions/ and unfixed/).

    python3 fuzz/node_ops_input.py OPS_FILE OUT_FILE

`arbitrary` picks an enum variant by scaling a u32 by the number of variants, so adding an
operation to `Op` re-reads every saved input as another operation list. Keep the readable
list next to the input (`<name>.ops`) and run this again after changing `Op`: it reads the
enums and structs from fuzz_targets/node_ops.rs, so it encodes what that file declares.

OPS_FILE: `cfg key=value ...` (missing keys are 0), `start_ms N`, then one operation per line,
`Variant field=value ...` in the target's Debug spelling (`Push who=0 app_id=0 msg=Notify`,
`AckOf back=2 tcp=false`, `Race who=0 notify=true gap=8 ack=true copy=true hb=false`); `#`
starts a comment. Byte fields (`Vec<u8>`: `Udp`/`TcpData` data, `Msg::Payload`) are spelled in
hex: `TcpData conn=0 data=hex:0201...`, `Push who=0 app_id=0 msg=Payload:hex:61`.

Encoding, as `arbitrary` 1.5.0 (fuzz/Cargo.lock) decodes it: integers little-endian in their
size, bool one byte (low bit), an enum variant a u32 tag (see `enc_tag`) then its fields. A
`Vec` is not given a length: `Vec<T>::arbitrary` reads a bool before each element (1: another
one follows) and stops at a 0 (`Unstructured::arbitrary_iter`), so a `Vec<u8>` in any position
is `01 b1 01 b2 ... 00`; the top-level `ops` list (the last field, `arbitrary_take_rest`) is
read the same way. (Lengths taken from the end of the data, `arbitrary_len`, are what `&[u8]`
and `String` use, not `Vec`.)
"""
import pathlib
import re
import struct
import sys

SRC = pathlib.Path(__file__).resolve().parent / "fuzz_targets" / "node_ops.rs"
SIZES = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


def declarations(text, keyword, name):
    """Fields (struct) or variants with their fields (enum), in declaration order."""
    body = re.search(r"%s %s \{\n(.*?)\n\}" % (keyword, name), text, re.S).group(1)
    body = re.sub(r"//.*", "", body)
    if keyword == "struct":
        return re.findall(r"(\w+): ([\w<>]+),", body)
    variants = []
    for m in re.finditer(r"^    (\w+)(?: \{(.*?)\}|\(([^)]*)\))?,", body, re.S | re.M):
        fields = re.findall(r"(\w+): ([\w<>]+),", m.group(2) or "")
        if m.group(3):
            fields = [("0", m.group(3).strip())]
        variants.append((m.group(1), fields))
    return variants


def enc_int(ty, v):
    return int(v).to_bytes(SIZES[ty], "little")


def enc_tag(k, n):
    # The smallest u32 `v` with (v * n) >> 32 == k.
    return struct.pack("<I", -(-(k << 32) // n))


def enc_value(text, ty, v):
    if ty in SIZES:
        return enc_int(ty, v)
    if ty == "bool":
        return bytes([1 if v in ("true", "1") else 0])
    if ty == "Vec<u8>":
        if not v.startswith("hex:"):
            sys.exit("byte field %r: spell it hex:0102..." % v)
        return b"".join(b"\x01" + bytes([b]) for b in bytes.fromhex(v[4:])) + b"\x00"
    variants = declarations(text, "enum", ty)
    name, _, arg = v.partition(":")
    names = [n for n, _ in variants]
    k = names.index(name)
    out = enc_tag(k, len(variants))
    for _, fty in variants[k][1]:
        out += enc_value(text, fty, arg)
    return out


def main():
    text = SRC.read_text()
    ops = declarations(text, "enum", "Op")
    names = [n for n, _ in ops]
    cfg, start, body = {}, 0, b""
    for line in pathlib.Path(sys.argv[1]).read_text().splitlines():
        line = line.split("#")[0].split()
        if not line:
            continue
        head = line[0]
        if head == "start_ms":
            start = int(line[1])
            continue
        kv = dict(p.split("=", 1) for p in line[1:])
        if head == "cfg":
            cfg.update(kv)
        else:
            k = names.index(head)
            body += b"\x01" + enc_tag(k, len(ops))
            for f, ty in ops[k][1]:
                body += enc_value(text, ty, kv[f])
    out = b""
    for f, ty in declarations(text, "struct", "Cfg"):
        out += enc_value(text, ty, cfg.get(f, "0"))
    out += enc_int("u32", start) + body + b"\x00"
    pathlib.Path(sys.argv[2]).write_bytes(out)


main()
