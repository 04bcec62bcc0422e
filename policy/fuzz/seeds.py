#!/usr/bin/env python3
"""Independent reference of keyway's version 1 keys, tokens and tickets (policy/src/auth).

Writes the fuzz seed corpus (valid encodings, binary and base64url, plus junk) and prints the
known answers pinned in the auth tests, so a wire-format change is caught by two implementations.

    python3 policy/fuzz/seeds.py            # from the repository root
"""

import base64
import hashlib
import hmac
import ipaddress
import pathlib
import struct

PROTO = {"tcp": 6, "udp": 17, "sctp": 132}


def ip16(text):
    a = ipaddress.ip_address(text)
    return b"\x00" * 10 + b"\xff\xff" + a.packed if a.version == 4 else a.packed


def mac(key, msg):
    return hmac.new(key, msg, hashlib.sha256).digest()


def workload_key(secret, identity, ip, epoch):
    i = identity.encode()
    msg = b"keyway/v1/workload-key" + struct.pack(">H", len(i)) + i + ip16(ip) + struct.pack(">I", epoch)
    return mac(secret, msg)


def ticket_key(secret, identity, ip, epoch):
    """The ticket key of one destination workload: only that workload's bundle carries it."""
    i = identity.encode()
    msg = b"keyway/v2/ticket-key" + struct.pack(">H", len(i)) + i + ip16(ip) + struct.pack(">I", epoch)
    return mac(secret, msg)


def header(epoch, src, dst, port, proto, issued_at_ms, nonce, version=1):
    return (bytes([version]) + struct.pack(">I", epoch) + ip16(src) + ip16(dst)
            + struct.pack(">HBQ", port, PROTO[proto], issued_at_ms) + nonce)


def token(key, *fields):
    body = header(*fields)
    return body + mac(key, body)[:16]


def ticket(key, identity, *fields):
    i = identity.encode()
    body = header(*fields) + struct.pack(">H", len(i)) + i
    return body + mac(key, body)[:16]


def b64(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def known_answers():
    secret = bytes([7]) * 32
    ident = "spiffe://cluster.local/ns/shop/sa/cart"
    now, nonce = 1_750_000_000_000, b"nonce-0123ab"
    k4 = workload_key(secret, ident, "10.1.2.3", 7)
    k6 = workload_key(secret, ident, "fd00::42", 7)
    dst_ident = "spiffe://cluster.local/ns/shop/sa/api"
    tk = ticket_key(secret, dst_ident, "10.9.8.7", 7)
    tk6 = ticket_key(secret, dst_ident, "fd00::1:43", 7)
    print("workload key v4", k4.hex())
    print("workload key v6", k6.hex())
    print("ticket key v4  ", tk.hex())
    print("ticket key v6  ", tk6.hex())
    print("token v4 ", b64(token(k4, 7, "10.1.2.3", "10.9.8.7", 8080, "tcp", now, nonce)).decode())
    print("token v6 ", b64(token(k6, 7, "fd00::42", "fd00::1:43", 53, "udp", now, nonce)).decode())
    print("ticket v4", b64(ticket(tk, ident, 7, "10.1.2.3", "10.9.8.7", 8080, "tcp", now, nonce)).decode())
    print("ticket v6", b64(ticket(tk6, ident, 7, "fd00::42", "fd00::1:43", 5000, "sctp", now, nonce)).decode())


def write_corpus(root):
    # The fuzz targets verify with these raw keys, so valid seeds reach the success path.
    tok_key, tkt_key = bytes([7]) * 32, bytes([9]) * 32
    now, nonce = 1_750_000_000_000, bytes(range(12))
    v4 = (1, "10.1.2.3", "10.9.8.7", 8080, "tcp", now, nonce)
    v6 = (2, "fd00::42", "fd00::1:43", 53, "udp", now, nonce)
    tok4, tok6 = token(tok_key, *v4), token(tok_key, *v6)
    ident = "spiffe://cluster.local/ns/shop/sa/cart"
    tkt4 = ticket(tkt_key, ident, *v4)
    tkt6 = ticket(tkt_key, "", *v6)
    tkt_long = ticket(tkt_key, "x" * 1024, 3, "10.0.0.1", "10.0.0.2", 9, "sctp", now, nonce)
    seeds = {
        "token_decode": {
            "valid-v4.bin": tok4,
            "valid-v6.bin": tok6,
            "valid-v4.txt": b64(tok4),
            "valid-v6.txt": b64(tok6),
            "version-2.bin": bytes([2]) + tok4[1:],
            "protocol-1.bin": tok4[:39] + bytes([1]) + tok4[40:],
            "truncated.txt": b64(tok4)[:-2],
            "padded.txt": base64.urlsafe_b64encode(tok4),
            "empty.bin": b"",
            "junk.txt": b"not a token \xff\x00",
        },
        "ticket_decode": {
            "valid-v4.bin": tkt4,
            "valid-v6-empty-identity.bin": tkt6,
            "valid-longest-identity.bin": tkt_long,
            "valid-v4.txt": b64(tkt4),
            "valid-v6-empty-identity.txt": b64(tkt6),
            "identity-not-utf8.bin": tkt4[:62] + b"\xff" + tkt4[63:],
            "identity-length-1025.bin": tkt4[:60] + struct.pack(">H", 1025) + tkt4[62:],
            "version-0.bin": bytes([0]) + tkt4[1:],
            "truncated.bin": tkt4[:-1],
            "empty.bin": b"",
            "junk.txt": b"%%%",
        },
    }
    for target, files in seeds.items():
        d = root / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (d / name).write_bytes(data)


if __name__ == "__main__":
    known_answers()
    write_corpus(pathlib.Path(__file__).resolve().parent / "corpus")
