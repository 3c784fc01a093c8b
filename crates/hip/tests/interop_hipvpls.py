#!/usr/bin/env python3
"""Runs the HIPv2 control plane of hip-vpls (github.com/strangebit-io/hip-vpls,
an independent Python implementation, not part of roam) as a Responder for
tests/interop.rs, over RFC 5770-style UDP on loopback.

hip-vpls speaks HIP directly over IPv4 (protocol 139): this driver wraps each
HIP packet received over UDP in an IPv4 header with a valid HIP checksum,
hands it to hiplib's HIPLib.process_hip_packet, and sends the HIP part of each
answer back over UDP. Nothing of hip-vpls is copied: its source directory is
given on the command line (a checkout of the repository's router1/).

usage: interop_hipvpls.py HIPLS_ROUTER_DIR WORKDIR ALG PEER_HIT_HEX
  ALG: ecdsa | rsa (our Responder's host identity)
Prints "READY <udp port> <our HIT hex>", then, once hip-vpls has processed
an I2, "I2 ESTABLISHED|REJECTED <its KEYMAT hex>" and exits (or "TIMEOUT"
after 30 s).
"""

import importlib
import importlib.abc
import importlib.util
import logging
import os
import socket
import sys
import time


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Debian ships pycryptodome as `Cryptodome`; hip-vpls imports `Crypto`."""

    def find_spec(self, name, path, target=None):
        if name == "Crypto" or name.startswith("Crypto."):
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module("Cryptodome" + spec.name[len("Crypto"):])

    def exec_module(self, module):
        pass


try:
    import Crypto  # noqa: F401
except ImportError:
    sys.meta_path.insert(0, _Alias())

from Crypto.PublicKey import ECC, RSA  # noqa: E402

# hiplib's network module imports netifaces for the data plane, which the
# control plane never calls: an empty stand-in is enough.
try:
    import netifaces  # noqa: F401
except ImportError:
    import types
    sys.modules["netifaces"] = types.ModuleType("netifaces")

OUR_IP, PEER_IP = "198.18.0.2", "198.18.0.1"


def hexgroups(b):
    h = b.hex()
    return ":".join(h[i:i + 4] for i in range(0, 32, 4))


def csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def wrap_ipv4(hip, src, dst):
    """IPv4 header + HIP packet with its checksum over the IPv4 pseudo-header."""
    hip = bytearray(hip)
    hip[4:6] = b"\0\0"
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + bytes([0, 139]) + len(hip).to_bytes(2, "big")
    hip[4:6] = csum(pseudo + bytes(hip)).to_bytes(2, "big")
    hdr = bytearray([0x45, 0, 0, 0, 0, 0, 0, 0, 64, 139, 0, 0])
    hdr[2:4] = (20 + len(hip)).to_bytes(2, "big")
    hdr += socket.inet_aton(src) + socket.inet_aton(dst)
    hdr[10:12] = csum(bytes(hdr)).to_bytes(2, "big")
    return bytes(hdr) + bytes(hip)


def main(router_dir, work, alg, peer_hit_hex):
    logging.basicConfig(level=os.environ.get("HIPVPLS_LOG", "CRITICAL").upper())
    os.makedirs(work, exist_ok=True)
    if alg == "rsa":
        key = RSA.generate(2048)
        sig_alg, hash_alg = 0x5, 0x1
    else:
        key = ECC.generate(curve="P-256")
        sig_alg, hash_alg = 0x7, 0x2
    priv = key.export_key(format="PEM")
    pub = key.public_key().export_key(format="PEM")
    for name, data in (("private.pem", priv), ("public.pem", pub)):
        with open(os.path.join(work, name), "w" if isinstance(data, str) else "wb") as f:
            f.write(data)
    sys.path.insert(0, router_dir)
    from hiplib import hlib  # noqa: E402

    cfg = {
        "switch": {"source_ip": OUR_IP, "dataplane_mode": "threads", "l2interface": "none",
                   "mesh": os.path.join(work, "mesh")},
        "network": {"tun_name": "none", "mtu": 1400},
        "security": {
            "public_key": os.path.join(work, "public.pem"),
            "private_key": os.path.join(work, "private.pem"),
            "sig_alg": sig_alg, "hash_alg": hash_alg,
            # hip-vpls hashes #I | HIT-R | HIT-I | #J (RFC 7401 §6.3 says
            # HIT-I | HIT-R), so only #K = 0 is solvable by both sides.
            "puzzle_difficulty": 0, "puzzle_lifetime_exponent": 37,
            "supported_DH_groups": [0x7, 0x3],
            "supported_ciphers": [0x2],
            "supported_hit_suits": [0x10, 0x20],
            "supported_transports": [0x0FFF],
            "supported_signatures": [0x5, 0x7],
            "supported_esp_transform_suits": [0x8],
        },
        "resolver": {"hosts_file": os.path.join(work, "hosts"),
                     "domain_identifier": {"type": 0x2, "value": "interop@roam.test"}},
        "general": {"i1_timeout_s": 20, "i1_retries": 3, "i2_retries": 3, "i2_timeout_s": 20,
                    "update_timeout_s": 120, "close_timeout_s": 30, "UAL": 120, "MSL": 120,
                    "EC": 120, "failed_timeout": 120, "rekey_after_packets": 1 << 30},
        "firewall": {"rules_file": os.path.join(work, "rules")},
    }
    peer = hexgroups(bytes.fromhex(peer_hit_hex))
    # The rules name HITs, so ours must exist first: write a placeholder,
    # build the library (which derives our HIT), then the real files.
    for name in ("hosts", "rules", "mesh"):
        open(os.path.join(work, name), "w").close()
    lib = hlib.HIPLib(cfg)
    me = hexgroups(bytes(lib.get_own_hit()))
    with open(os.path.join(work, "hosts"), "w") as f:
        f.write(f"{peer} {PEER_IP}\n{me} {OUR_IP}\n")
    with open(os.path.join(work, "rules"), "w") as f:
        f.write(f"{peer} {me} allow\n{me} {peer} allow\n")
    # (HIPLib.reload_config calls a resolver method that does not exist.)
    lib.firewall.load_rules(os.path.join(work, "rules"))
    lib.hit_resolver = type(lib.hit_resolver)(filename=os.path.join(work, "hosts"))

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.5)
    print("READY", sock.getsockname()[1], bytes(lib.get_own_hit()).hex(), flush=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            data, addr = sock.recvfrom(4096)
        except socket.timeout:
            continue
        if len(data) < 4 or data[:4] != b"\0\0\0\0":
            continue
        for out, _dst in lib.process_hip_packet(bytearray(wrap_ipv4(data[4:], PEER_IP, OUR_IP))):
            ihl = (out[0] & 0x0F) * 4
            sock.sendto(b"\0\0\0\0" + bytes(out[ihl:]), addr)
        a, b = bytes.fromhex(peer_hit_hex).hex(), bytes(lib.get_own_hit()).hex()
        # hip-vpls stores the KEYMAT when it has processed I2's puzzle and
        # DH, before it checks HIP_MAC: report it, and whether it went on.
        km = lib.keymat_storage.get(a, b) or lib.keymat_storage.get(b, a)
        if km:
            st = lib.hip_state_machine.get(a, b) if a < b else lib.hip_state_machine.get(b, a)
            state = "ESTABLISHED" if (st.is_established() or st.is_r2_sent()) else "REJECTED"
            print("I2", state, bytes(km).hex(), flush=True)
            return
    print("TIMEOUT", flush=True)
    sys.exit(1)


if __name__ == "__main__":
    main(*sys.argv[1:5])
