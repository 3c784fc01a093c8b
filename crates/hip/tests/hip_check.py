#!/usr/bin/env python3
"""Independent RFC 7401 check of a HIPv2 base exchange produced by roam-hip.

Written from the RFC text with Python's hashlib/hmac and the `cryptography`
package, sharing no code with the Rust crate. Input: a directory holding
i1.bin, r1.bin, i2.bin, r2.bin (encoded HIP packets, zero checksum as sent
in UDP) and keymat.hex (the KEYMAT both ends derived). Exit status 0 means
every check passed; otherwise the failed check is printed.
"""

import hashlib
import hmac
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CONTEXT_ID = bytes.fromhex("F0EFF02FBFF43D0FE7930C3C6E6174EA")
T_R1_COUNTER, T_PUZZLE, T_SOLUTION = 129, 257, 321
T_DH_GROUP_LIST, T_DH, T_CIPHER, T_ENCRYPTED = 511, 513, 579, 641
T_HOST_ID, T_HIT_SUITE_LIST, T_TFL, T_ESP_TRANSFORM = 705, 715, 2049, 4095
T_ESP_INFO = 65
T_MAC, T_MAC2, T_SIG2, T_SIG = 61505, 61569, 61633, 61697


def check(cond, what):
    if not cond:
        print("FAILED:", what)
        sys.exit(1)


def parse(buf, want_type):
    check(len(buf) >= 40, "packet shorter than the fixed header")
    nh, hlen, ptype, ver = buf[0], buf[1], buf[2], buf[3]
    check(nh == 59, "next header is IPPROTO_NONE")
    check((hlen + 1) * 8 == len(buf), "header length matches packet length")
    check(ptype == want_type, f"packet type {ptype} == {want_type}")
    check(ver >> 4 == 2 and ver & 1 == 1, "version 2 with fixed bit")
    check(buf[4:6] == b"\0\0", "checksum zero inside UDP (RFC 5770)")
    params, off, prev = [], 40, 0
    while off < len(buf):
        t = int.from_bytes(buf[off:off + 2], "big")
        length = int.from_bytes(buf[off + 2:off + 4], "big")
        total = 11 + length - (length + 3) % 8
        check(total % 8 == 0 and off + total <= len(buf), f"TLV {t} fits")
        check(t >= prev, f"TLV {t} in type order")
        check(all(b == 0 for b in buf[off + 4 + length:off + total]), f"TLV {t} zero padding")
        params.append((t, off, buf[off + 4:off + 4 + length], buf[off:off + total]))
        prev, off = t, off + total
    return params


def get(params, t):
    for p in params:
        if p[0] == t:
            return p
    check(False, f"parameter {t} present")


def covered(buf, params, below, extra=b"", zero_receiver=False, zero_puzzle=False):
    """Header (checksum 0, length recomputed) + TLVs with type < below."""
    body = bytearray()
    for t, off, contents, wire in params:
        if t < below:
            w = bytearray(wire)
            if zero_puzzle and t == T_PUZZLE:
                w[4 + 2:] = bytes(len(w) - 6)  # Opaque and #I
                # keep TLV padding layout: contents length unchanged
            body += w
    body += extra
    hdr = bytearray(buf[:40])
    hdr[1] = (40 + len(body)) // 8 - 1
    hdr[4:6] = b"\0\0"
    if zero_receiver:
        hdr[24:40] = bytes(16)
    return bytes(hdr + body)


# HIT suite (OGA ID) -> hash (RFC 7401 Table 10): 1 = RSA/DSA with SHA-256,
# 2 = ECDSA with SHA-384. The suite follows from the HI algorithm.
SUITE_HASH = {1: hashlib.sha256, 2: hashlib.sha384}
ALG_SUITE = {5: 1, 7: 2}


def hit_of(hi, suite):
    h = SUITE_HASH[suite](CONTEXT_ID + hi).digest()
    start = (len(h) - 12) // 2
    return bytes([0x20, 0x01, 0x00, 0x20 | suite]) + h[start:start + 12]


def host_key(host_id_contents):
    """(HI, public key, algorithm) of a HOST_ID: ECDSA P-256 or RSA (RFC 3110)."""
    hi_len = int.from_bytes(host_id_contents[0:2], "big")
    alg = int.from_bytes(host_id_contents[4:6], "big")
    hi = host_id_contents[6:6 + hi_len]
    if alg == 7:
        check(hi[0:2] == b"\0\1" and hi[2] == 4 and len(hi) == 67, "P-256 uncompressed HI")
        x, y = int.from_bytes(hi[3:35], "big"), int.from_bytes(hi[35:67], "big")
        return hi, ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key(), alg
    check(alg == 5, "HI algorithm ECDSA (7) or RSA (5)")
    if hi[0] != 0:
        elen, rest = hi[0], hi[1:]
    else:
        elen, rest = int.from_bytes(hi[1:3], "big"), hi[3:]
    e, n = rest[:elen], rest[elen:]
    check(e[0] != 0 and n[0] != 0, "RFC 3110: no leading zero octets")
    pub = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
    return hi, pub, alg


def verify_sig(key, alg, sig_contents, data, what):
    check(int.from_bytes(sig_contents[0:2], "big") == alg, f"{what} algorithm {alg}")
    sig = sig_contents[2:]
    try:
        if alg == 7:
            check(len(sig) == 64, f"{what} is r|s")
            der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
            key.verify(der, data, ec.ECDSA(hashes.SHA384()))
        else:
            check(len(sig) == key.key_size // 8, f"{what} is as long as the modulus")
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            key.verify(sig, data, pss, hashes.SHA256())
    except Exception:
        check(False, f"{what} verifies")


def main(d):
    d = Path(d)
    i1, r1, i2, r2 = (d.joinpath(n).read_bytes() for n in ("i1.bin", "r1.bin", "i2.bin", "r2.bin"))
    keymat = bytes.fromhex(d.joinpath("keymat.hex").read_text().strip())

    p_i1 = parse(i1, 1)
    hit_i, hit_r = i1[8:24], i1[24:40]
    groups = get(p_i1, T_DH_GROUP_LIST)[2]

    p_r1 = parse(r1, 2)
    check(r1[8:24] == hit_r and r1[24:40] == hit_i, "R1 HITs")
    host_r = get(p_r1, T_HOST_ID)
    hi_r, key_r, alg_r = host_key(host_r[2])
    suite_r, suite_i = ALG_SUITE[alg_r], hit_i[3] & 0x0F
    check(hit_of(hi_r, suite_r) == hit_r, "Responder HIT = ORCHIDv2(suite hash, HI)")
    suites = get(p_r1, T_HIT_SUITE_LIST)[2]
    check(suites[0] == suite_r << 4, "HIT_SUITE_LIST starts with the Responder's suite")
    check(suite_i << 4 in suites, "HIT_SUITE_LIST accepts the Initiator's suite")
    # RHASH is the Responder's suite hash: puzzle, HMAC and KDF use it.
    rh = SUITE_HASH[suite_r]
    n = rh().digest_size
    dh = get(p_r1, T_DH)[2]
    r_groups = get(p_r1, T_DH_GROUP_LIST)[2]
    best = next(g for g in r_groups if g in groups)
    check(dh[0] == best, "R1 DH group is the best common one")
    check(int.from_bytes(dh[1:3], "big") == len(dh) - 3, "DH public value length")
    check(get(p_r1, T_TFL)[2] == T_ESP_TRANSFORM.to_bytes(2, "big"), "R1 transport = ESP")
    get(p_r1, T_ESP_TRANSFORM)
    verify_sig(key_r, alg_r, get(p_r1, T_SIG2)[2],
               covered(r1, p_r1, T_SIG2, zero_receiver=True, zero_puzzle=True), "R1 HIP_SIGNATURE_2")
    puzzle = get(p_r1, T_PUZZLE)[2]
    k, I = puzzle[0], puzzle[4:]
    check(len(I) == n, "#I is RHASH_len")

    p_i2 = parse(i2, 3)
    check(i2[8:24] == hit_i and i2[24:40] == hit_r, "I2 HITs")
    check(get(p_i2, T_R1_COUNTER)[3] == get(p_r1, T_R1_COUNTER)[3], "R1_COUNTER echoed verbatim")
    sol = get(p_i2, T_SOLUTION)[2]
    check(sol[0] == k and sol[2:4] == puzzle[2:4], "SOLUTION echoes #K and Opaque")
    check(sol[4:4 + n] == I, "SOLUTION echoes #I")
    J = sol[4 + n:4 + 2 * n]
    h = int.from_bytes(rh(I + hit_i + hit_r + J).digest(), "big")
    check(h & ((1 << k) - 1) == 0, "puzzle: low #K bits of RHASH(I|HIT-I|HIT-R|J) are zero")
    cipher = get(p_i2, T_CIPHER)[2]
    check(cipher == b"\x00\x02", "I2 picked AES-128-CBC")
    check(get(p_i2, T_DH)[2][0] == best, "I2 DH group")

    # KEYMAT drawing order (§6.5): HOST_g's keys first.
    i_is_g = int.from_bytes(hit_i, "big") > int.from_bytes(hit_r, "big")
    gl_enc, gl_mac = keymat[0:16], keymat[16:16 + n]
    lg_enc, lg_mac = keymat[16 + n:32 + n], keymat[32 + n:32 + 2 * n]
    i_enc, i_mac = (gl_enc, gl_mac) if i_is_g else (lg_enc, lg_mac)
    r_mac = lg_mac if i_is_g else gl_mac

    enc = get(p_i2, T_ENCRYPTED)[2]
    iv, ct = enc[4:20], enc[20:]
    dec = Cipher(algorithms.AES(i_enc), modes.CBC(iv)).decryptor()
    plain = dec.update(ct) + dec.finalize()
    check(int.from_bytes(plain[0:2], "big") == T_HOST_ID, "ENCRYPTED holds HOST_ID")
    hl = int.from_bytes(plain[2:4], "big")
    hi_i, key_i, alg_i = host_key(plain[4:4 + hl])
    check(ALG_SUITE[alg_i] == suite_i, "Initiator HIT suite matches its HI algorithm")
    check(hit_of(hi_i, suite_i) == hit_i, "Initiator HIT = ORCHIDv2(suite hash, HI)")
    mac = hmac.new(i_mac, covered(i2, p_i2, T_MAC), rh).digest()
    check(get(p_i2, T_MAC)[2] == mac, "I2 HIP_MAC (HMAC-RHASH, Initiator key)")
    verify_sig(key_i, alg_i, get(p_i2, T_SIG)[2], covered(i2, p_i2, T_SIG), "I2 HIP_SIGNATURE")
    check(len(get(p_i2, T_ESP_INFO)[2]) == 12, "I2 ESP_INFO")

    p_r2 = parse(r2, 4)
    check(r2[8:24] == hit_r and r2[24:40] == hit_i, "R2 HITs")
    mac2 = hmac.new(r_mac, covered(r2, p_r2, T_MAC2, extra=host_r[3]), rh).digest()
    check(get(p_r2, T_MAC2)[2] == mac2, "R2 HIP_MAC_2 (covers the R1 HOST_ID)")
    verify_sig(key_r, alg_r, get(p_r2, T_SIG)[2], covered(r2, p_r2, T_SIG), "R2 HIP_SIGNATURE")
    print("independent check: all RFC 7401 base exchange checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
