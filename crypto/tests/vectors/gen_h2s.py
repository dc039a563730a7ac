#!/usr/bin/env python3
"""Generate h2s_quorate_v1.json: known answers for Quorate's hash-to-scalar.

    H2S(tag, msg) = OS2IP(expand_message_xmd(msg, DST, 48)) mod q
    DST           = b"QUORATE-V1-" || tag

with expand_message_xmd over SHA-256 (RFC 9380 §5.3.1) and q the order of P-256.
This is RFC 9380 hash_to_field with count = 1 and L = 48 = ceil((256 + 128) / 8),
written here from the RFC text alone so that it checks the Rust code independently.

Standard library only. Usage:
    python3 gen_h2s.py          # (re)write h2s_quorate_v1.json beside this script
    python3 gen_h2s.py --check  # exit non-zero if the committed file differs
"""

import hashlib
import json
import pathlib
import sys

# Order of the P-256 group.
Q = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# Base field prime of P-256 (used only by the self-check against Appendix J.1.1).
P = 2**256 - 2**224 + 2**192 + 2**96 - 1

DST_PREFIX = b"QUORATE-V1-"
H2S_LEN = 48
OUT = pathlib.Path(__file__).with_name("h2s_quorate_v1.json")

SHA256_OUT = 32  # b_in_bytes
SHA256_BLOCK = 64  # s_in_bytes


def expand_message_xmd(msg: bytes, dst: bytes, len_in_bytes: int) -> bytes:
    """RFC 9380 §5.3.1 with H = SHA-256."""
    if len(dst) > 255:
        raise ValueError("DST longer than 255 bytes")
    ell = -(-len_in_bytes // SHA256_OUT)
    if ell > 255 or len_in_bytes > 65535:
        raise ValueError("requested output too long")
    dst_prime = dst + len(dst).to_bytes(1, "big")
    z_pad = bytes(SHA256_BLOCK)
    l_i_b_str = len_in_bytes.to_bytes(2, "big")
    b_0 = hashlib.sha256(z_pad + msg + l_i_b_str + b"\x00" + dst_prime).digest()
    blocks = [hashlib.sha256(b_0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        chained = bytes(a ^ b for a, b in zip(b_0, blocks[-1]))
        blocks.append(hashlib.sha256(chained + i.to_bytes(1, "big") + dst_prime).digest())
    return b"".join(blocks)[:len_in_bytes]


def hash_to_scalar(tag: str, msg: bytes) -> int:
    uniform = expand_message_xmd(msg, DST_PREFIX + tag.encode("ascii"), H2S_LEN)
    return int.from_bytes(uniform, "big") % Q


def self_check() -> None:
    """Compare against published RFC 9380 values; exit non-zero on any mismatch."""
    failures = []

    # Appendix K.1: expand_message_xmd(SHA-256), len_in_bytes = 0x20.
    k1_dst = b"QUUX-V01-CS02-with-expander-SHA256-128"
    k1 = [
        (b"", "68a985b87eb6b46952128911f2a4412bbc302a9d759667f87f7a21d803f07235"),
        (b"abc", "d8ccab23b5985ccea865c6c97b6e5b8350e794e603b4b97902f53a8a0d605615"),
    ]
    for msg, want in k1:
        got = expand_message_xmd(msg, k1_dst, 0x20).hex()
        if got != want:
            failures.append(f"K.1 msg={msg!r}: got {got}, want {want}")

    # Appendix J.1.1 (P256_XMD:SHA-256_SSWU_RO_, msg ""): hash_to_field with count = 2,
    # L = 48, which exercises the multi-block path (len_in_bytes = 96) and the mod step.
    j11_dst = b"QUUX-V01-CS02-with-P256_XMD:SHA-256_SSWU_RO_"
    uniform = expand_message_xmd(b"", j11_dst, 2 * H2S_LEN)
    u = [int.from_bytes(uniform[i * H2S_LEN : (i + 1) * H2S_LEN], "big") % P for i in range(2)]
    want_u = [
        0xAD5342C66A6DD0FF080DF1DA0EA1C04B96E0330DD89406465EEBA11582515009,
        0x8C0F1D43204BD6F6EA70AE8013070A1518B43873BCD850AAFA0A9E220E2EEA5A,
    ]
    if u != want_u:
        failures.append(f"J.1.1 hash_to_field: got {[hex(x) for x in u]}")

    # RFC 9497 (OPRF) Appendix A.3, P256-SHA256 mode 0x00: DeriveKeyPair is the same
    # 48-bytes-mod-q hash-to-scalar, so this pins the reduction modulo q.
    # Input: seed || I2OSP(len(info), 2) || info || I2OSP(counter = 0, 1).
    seed, info = bytes([0xA3]) * 32, b"test key"
    oprf_msg = seed + len(info).to_bytes(2, "big") + info + b"\x00"
    oprf_dst = b"DeriveKeyPairOPRFV1-\x00-P256-SHA256"
    sk = int.from_bytes(expand_message_xmd(oprf_msg, oprf_dst, H2S_LEN), "big") % Q
    want_sk = "159749d750713afe245d2d39ccfaae8381c53ce92d098a9375ee70739c7ac0bf"
    if format(sk, "064x") != want_sk:
        failures.append(f"RFC 9497 DeriveKeyPair: got {sk:064x}, want {want_sk}")

    if failures:
        for line in failures:
            print("self-check FAILED:", line, file=sys.stderr)
        sys.exit(1)


def cases() -> list[tuple[str, bytes]]:
    long_msg = bytes((37 * i + 11) & 0xFF for i in range(200))
    all_bytes = bytes(range(256))
    return [
        ("rerand", b""),
        ("rerand", b"abc"),
        ("schnorr", b"abc"),
        ("schnorr", long_msg),
        ("dleq", b""),
        ("dleq", all_bytes),
        ("test", b"abc"),
        ("test", all_bytes),
    ]


def document() -> str:
    vectors = []
    for tag, msg in cases():
        dst = DST_PREFIX + tag.encode("ascii")
        vectors.append(
            {
                "tag": tag,
                "dst": dst.decode("ascii"),
                "msg_hex": msg.hex(),
                "uniform_bytes_hex": expand_message_xmd(msg, dst, H2S_LEN).hex(),
                "scalar_hex": format(hash_to_scalar(tag, msg), "064x"),
            }
        )
    doc = {
        "source": "crypto/tests/vectors/gen_h2s.py (independent Python implementation of RFC 9380 expand_message_xmd, SHA-256)",
        "definition": "H2S(tag, msg) = OS2IP(expand_message_xmd(msg, \"QUORATE-V1-\" || tag, 48)) mod q, q = order of P-256",
        "encoding": "msg_hex: message bytes; uniform_bytes_hex: the 48 expanded bytes before reduction; scalar_hex: 32-byte big-endian scalar",
        "vectors": vectors,
    }
    return json.dumps(doc, indent=2) + "\n"


def main() -> None:
    self_check()
    text = document()
    if sys.argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.name} is out of date; run gen_h2s.py", file=sys.stderr)
            sys.exit(1)
        print(f"{OUT.name} is up to date")
        return
    if sys.argv[1:]:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
