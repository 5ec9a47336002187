"""SecAgg+ (Bell et al., CCS 2020) for fedllm: the coordinator only ever sees masked updates.

Flower-free and in-process testable: every stage is a plain method taking and returning small
dataclasses of ints, bytes and arrays. ``server/secagg.py`` carries them over Flower Messages
and ``client/app.py`` keeps a node's :class:`NodeSession` in the node's own Flower context.

Stages of one round (U1 ⊇ U2 ⊇ U3 ⊇ U4 are the nodes still answering at each stage):

1. advertise   node trains, then sends two fresh X25519 public keys (c: share encryption,
               s: pairwise masks), its weight w (= num_examples, already public metadata) and a
               SHA-256 commitment to its self-mask seed b.                          -> U1
2. share keys  coordinator broadcasts U1's adverts; each node Shamir-shares b and its mask
               secret key s_sk with threshold t over GF(2^521 - 1) and AES-GCM-encrypts one
               share pair per peer (key: X25519(c_i, c_j) + HKDF-SHA256; associated data:
               run, round, sender, receiver). The coordinator relays ciphertexts.   -> U2
3. masked input each node in U2 decrypts the shares addressed to it (tampered or misrouted
               ones fail authentication) and uploads y = v + PRG(b) + Σ_j ±PRG(s_ij) mod 2^k,
               where v = [w·q(x) ..., w, clipped] and PRG = ChaCha20 keyed with 256-bit
               seeds (pairwise seed: X25519(s_i, s_j) + HKDF).                        -> U3
4. unmask      survivors return shares of b_i for i in U3 and of s_sk_d for d in U2 \\ U3
               (never both for one node); the coordinator reconstructs from >= t shares,
               checks every secret against its commitment / public key, and removes the
               masks: Σ_{U3} y_i - Σ PRG(b_i) ± PRG(s_dk) = Σ_{U3} v_i.              -> U4

Quantisation (documented in NOTES): a node's update x (the *delta* to the global adapter, so
the clipping range is about one round's change) is clipped to [-clip, clip] and rounded to
q(x) = round((x + clip) · (2^bits - 1) / (2·clip)) in [0, 2^bits - 1]; the node then
multiplies by its integer weight w in the ring. The ring is Z_M, M = 2^k, with k the smallest
multiple of 8 such that Σ_{U1} w_i · (2^bits - 1) < 2^k and |U1| · len(x) < 2^k: no sum of the
nodes' vectors can wrap around. Arithmetic is in uint64 (2^k divides 2^64); k/8 bytes per
coordinate travel. FedAvg = Σ w_i q(x_i) / Σ w_i, decoded as  S / W · 2·clip/(2^bits - 1) - clip,
within clip / (2^bits - 1) per coordinate of the clear FedAvg of the clipped updates.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# Shamir field: the Mersenne prime 2^521 - 1 (> any 256-bit secret; fast reduction).
PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32
VERSION = b"fedllm-secagg/v1"


class SecAggError(RuntimeError):
    """The secure aggregation round cannot go on; the message says which node/stage/why."""


# ---------------------------------------------------------------------------------------------
# Parameters and public round identity


@dataclass(frozen=True)
class SecAggParams:
    clip: float = 1.0  # each coordinate of a node's delta is clipped to [-clip, clip]
    bits: int = 20  # fixed-point precision of one coordinate
    threshold_fraction: float = 2 / 3  # t = max(2, ceil(fraction · |U1|))

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ValueError(f"secagg clip must be a positive finite number, got {self.clip}")
        if not 2 <= self.bits <= 32:
            raise ValueError(f"secagg bits must be in [2, 32], got {self.bits}")
        if not 0.5 < self.threshold_fraction <= 1:
            raise ValueError("secagg threshold_fraction must be in (0.5, 1], got "
                             f"{self.threshold_fraction}")

    def threshold(self, n: int) -> int:
        """Shares needed to reconstruct; > n/2 so no two disjoint sets can both unmask."""
        return min(n, max(2, math.ceil(self.threshold_fraction * n - 1e-9)))

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def step(self) -> float:
        """Width of one quantisation level; the worst-case rounding error is step / 2."""
        return 2 * self.clip / self.levels


@dataclass(frozen=True)
class RoundId:
    """Public identity of a round, bound into every key derivation and ciphertext."""

    run_id: str
    round: int

    def tag(self) -> bytes:
        return VERSION + b"|" + self.run_id.encode() + b"|" + str(self.round).encode()


def ring_bits(weights: Iterable[int], *, bits: int, length: int) -> int:
    """Smallest multiple of 8 bits k such that the sum of all nodes' vectors cannot wrap."""
    ws = list(weights)
    bound = max(sum(ws) * ((1 << bits) - 1), len(ws) * (length + 1), 1)
    k = 8 * math.ceil(bound.bit_length() / 8)
    if k > 64:
        raise SecAggError(f"total weight {sum(ws)} at {bits} bits overflows a 64-bit ring; "
                          "lower secagg.bits")
    return k


# ---------------------------------------------------------------------------------------------
# Quantisation


def quantize(x: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, int]:
    """Clip to [-clip, clip], round to [0, 2^bits - 1]; returns (uint64 levels, #clipped)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(x).all():
        raise SecAggError("the update contains NaN or Inf: it cannot be quantised")
    clipped = int(np.count_nonzero(np.abs(x) > params.clip))
    xc = np.clip(x, -params.clip, params.clip)
    q = np.rint((xc + params.clip) / params.step)
    return np.clip(q, 0, params.levels).astype(np.uint64), clipped


def dequantize_mean(total: np.ndarray, weight: int, params: SecAggParams) -> np.ndarray:
    """Weighted mean of the clipped updates from Σ w_i q(x_i) (uint64) and W = Σ w_i."""
    if weight <= 0:
        raise SecAggError(f"aggregate weight must be positive, got {weight}")
    return total.astype(np.float64) / weight * params.step - params.clip


def pack(vec: np.ndarray, k: int) -> bytes:
    """k/8 little-endian bytes per coordinate (the ring element's wire form)."""
    b = np.ascontiguousarray(vec, dtype="<u8").view(np.uint8).reshape(-1, 8)
    return b[:, : k // 8].tobytes()


def unpack(data: bytes, k: int, length: int) -> np.ndarray:
    nb = k // 8
    if len(data) != nb * length:
        raise SecAggError(f"masked vector has {len(data)} bytes, expected {nb * length}")
    b = np.zeros((length, 8), dtype=np.uint8)
    b[:, :nb] = np.frombuffer(data, dtype=np.uint8).reshape(length, nb)
    return b.view("<u8").ravel().astype(np.uint64)


def _mask_of(k: int) -> np.uint64:
    return np.uint64((1 << k) - 1) if k < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)


# ---------------------------------------------------------------------------------------------
# Cryptographic building blocks


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform uint64 from a 256-bit seed (ChaCha20 keystream, zero nonce: every
    seed is a fresh HKDF output bound to run, round and node ids, so it is used once)."""
    if len(seed) != 32:
        raise ValueError("PRG seeds are 32 bytes")
    enc = Cipher(algorithms.ChaCha20(seed, b"\x00" * 16), mode=None).encryptor()
    return np.frombuffer(enc.update(b"\x00" * (8 * length)), dtype="<u8").astype(np.uint64)


def _raw_pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_priv(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _pair(a: int, b: int) -> bytes:
    lo, hi = sorted((a, b))
    return f"{lo}|{hi}".encode()


def pairwise_seed(rid: RoundId, sk: bytes, peer_pk: bytes, me: int, peer: int) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(sk).exchange(
        X25519PublicKey.from_public_bytes(peer_pk))
    return _hkdf(shared, rid.tag() + b"|mask|" + _pair(me, peer))


def self_seed(rid: RoundId, b: bytes, node: int) -> bytes:
    return _hkdf(b, rid.tag() + b"|self|" + str(node).encode())


def commitment(rid: RoundId, b: bytes, node: int) -> bytes:
    return hashlib.sha256(rid.tag() + b"|commit|" + str(node).encode() + b"|" + b).digest()


def _share_key(rid: RoundId, c_sk: bytes, peer_pk: bytes, me: int, peer: int) -> bytes:
    shared = X25519PrivateKey.from_private_bytes(c_sk).exchange(
        X25519PublicKey.from_public_bytes(peer_pk))
    return _hkdf(shared, rid.tag() + b"|enc|" + _pair(me, peer))


def _share_ad(rid: RoundId, sender: int, receiver: int) -> bytes:
    return rid.tag() + f"|share|{sender}->{receiver}".encode()


def shamir_split(secret: bytes, xs: list[int], t: int) -> dict[int, int]:
    """Shares f(x) of a degree t-1 polynomial with f(0) = secret, one per x in ``xs``."""
    s = int.from_bytes(secret, "big")
    coeffs = [s] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        acc = 0
        for c in reversed(coeffs):
            acc = (acc * x + c) % PRIME
        out[x] = acc
    return out


def shamir_reconstruct(shares: Mapping[int, int], t: int) -> bytes:
    """The secret from >= t shares {x: y}; every extra share must lie on the same polynomial
    (an inconsistent one raises). Fewer than t shares raise."""
    if len(shares) < t:
        raise SecAggError(f"{len(shares)} share(s), {t} needed to reconstruct")
    pts = list(shares.items())
    if any(x <= 0 for x, _ in pts):
        raise SecAggError("share x-coordinates must be positive")
    base = pts[:t]

    def at(z: int) -> int:
        acc = 0
        for i, (xi, yi) in enumerate(base):
            num = den = 1
            for j, (xj, _) in enumerate(base):
                if i != j:
                    num = num * (z - xj) % PRIME
                    den = den * (xi - xj) % PRIME
            acc = (acc + yi * num * pow(den, -1, PRIME)) % PRIME
        return acc

    for x, y in pts[t:]:
        if at(x) != y:
            raise SecAggError(f"share at x={x} is inconsistent with the others")
    s = at(0)
    if s >= 1 << (8 * SECRET_BYTES):
        raise SecAggError("reconstructed secret out of range (tampered shares)")
    return s.to_bytes(SECRET_BYTES, "big")


# ---------------------------------------------------------------------------------------------
# Stage messages (plain data; server/secagg.py maps them to Flower records)


@dataclass(frozen=True)
class KeyAdvert:
    c_pk: bytes
    s_pk: bytes
    weight: int
    b_commit: bytes


@dataclass(frozen=True)
class ShareKeysRequest:
    adverts: dict[int, KeyAdvert]  # U1


@dataclass(frozen=True)
class MaskRequest:
    ciphertexts: list[tuple[int, bytes]]  # (sender, ct) addressed to this node, from U2


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: list[int]  # U3: uploaded a masked vector
    dropped: list[int]  # U2 \ U3: shared keys, then vanished


@dataclass(frozen=True)
class UnmaskReply:
    b_shares: list[tuple[int, int, int]]  # (owner, x, y) for owners in U3
    sk_shares: list[tuple[int, int, int]]  # (owner, x, y) for owners in U2 \ U3


@dataclass(frozen=True)
class Aggregate:
    mean: np.ndarray  # float64 weighted mean of the nodes' clipped updates
    total_weight: int
    clipped: int  # coordinates clipped, summed over the aggregated nodes
    aggregated: list[int]  # U3
    dropped: list[int]  # U2 \ U3 (masks removed via their reconstructed keys)


@dataclass
class SecureRoundResult:
    """What a transport's secure round hands the coordinator: per-node reply metadata (no
    arrays) or a failure reason, and the unmasked weighted mean of the nodes' updates."""

    replies: dict[int, Any]  # node id -> TrainReply without arrays, or a failure reason (str)
    bytes_sent: dict[int, int] = field(default_factory=dict)  # per node, all stages
    reasons: dict[int, str] = field(default_factory=dict)  # why a node that trained dropped
    mean: dict[str, np.ndarray] | None = None  # weighted mean update (delta), float32
    total_weight: int = 0
    clipped: int = 0
    aggregated: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)  # trained and advertised, not aggregated
    error: str | None = None  # the round's secure aggregation failed (SecAggError message)


def share_index(nodes: Iterable[int], node: int) -> int:
    """Shamir x-coordinate of ``node``: its 1-based position among the sorted U1."""
    return sorted(nodes).index(node) + 1


def _encode_share(x: int, yb: int, ysk: int) -> bytes:
    return (x.to_bytes(4, "big") + yb.to_bytes(SHARE_BYTES, "big")
            + ysk.to_bytes(SHARE_BYTES, "big"))


def _decode_share(pt: bytes) -> tuple[int, int, int]:
    if len(pt) != 4 + 2 * SHARE_BYTES:
        raise SecAggError("decrypted share has the wrong length")
    return (int.from_bytes(pt[:4], "big"), int.from_bytes(pt[4:4 + SHARE_BYTES], "big"),
            int.from_bytes(pt[4 + SHARE_BYTES:], "big"))


# ---------------------------------------------------------------------------------------------
# Node side


@dataclass
class NodeSession:
    """A node's secret protocol state for one round. It never leaves the node: client/app.py
    persists it in the node's own Flower Context.state between stage messages."""

    rid: RoundId
    node: int
    params: SecAggParams
    update: np.ndarray  # float32 clear delta, flattened
    weight: int
    c_sk: bytes
    s_sk: bytes
    b: bytes
    stage: str = "advertised"
    adverts: dict[int, KeyAdvert] = field(default_factory=dict)
    # Shares received, {owner: (x, share of b, share of s_sk)}, own share included.
    shares: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, rid: RoundId, node: int, *, params: SecAggParams, update: np.ndarray,
              weight: int) -> tuple[NodeSession, KeyAdvert]:
        if int(weight) < 1:
            raise SecAggError(f"node {node}: weight must be a positive integer, got {weight}")
        c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        b = secrets.token_bytes(SECRET_BYTES)
        sess = cls(rid, node, params, np.asarray(update, dtype=np.float32).ravel(), int(weight),
                   _raw_priv(c), _raw_priv(s), b)
        return sess, KeyAdvert(_raw_pub(c), _raw_pub(s), int(weight), commitment(rid, b, node))

    def _expect(self, stage: str, nxt: str) -> None:
        if self.stage != stage:
            raise SecAggError(f"node {self.node}: stage '{nxt}' requested in state "
                              f"'{self.stage}' (replayed or out-of-order message)")
        self.stage = nxt

    def share_keys(self, req: ShareKeysRequest) -> dict[int, bytes]:
        """Stage 2: encrypted (share of b, share of s_sk) for each peer in U1."""
        self._expect("advertised", "shared")
        mine = req.adverts.get(self.node)
        if mine is None or mine.c_pk != _raw_pub(X25519PrivateKey.from_private_bytes(self.c_sk)) \
                or mine.s_pk != _raw_pub(X25519PrivateKey.from_private_bytes(self.s_sk)):
            raise SecAggError(f"node {self.node}: the broadcast key list misrepresents this node")
        pks = [(a.c_pk, a.s_pk) for a in req.adverts.values()]
        if len({p for pair in pks for p in pair}) != 2 * len(pks):
            raise SecAggError("duplicate public keys in the broadcast key list")
        n = len(req.adverts)
        t = self.params.threshold(n)
        if n < 3:
            raise SecAggError(f"only {n} node(s) advertised keys: secure aggregation needs >= 3")
        self.adverts = dict(req.adverts)
        xs = {nid: share_index(req.adverts, nid) for nid in req.adverts}
        sb = shamir_split(self.b, list(xs.values()), t)
        ssk = shamir_split(self.s_sk, list(xs.values()), t)
        out: dict[int, bytes] = {}
        for nid, x in xs.items():
            if nid == self.node:
                self.shares[nid] = (x, sb[x], ssk[x])
                continue
            key = _share_key(self.rid, self.c_sk, req.adverts[nid].c_pk, self.node, nid)
            nonce = os.urandom(12)
            out[nid] = nonce + AESGCM(key).encrypt(nonce, _encode_share(x, sb[x], ssk[x]),
                                                   _share_ad(self.rid, self.node, nid))
        return out

    def masked_input(self, req: MaskRequest) -> bytes:
        """Stage 3: decrypt and keep the shares addressed here, upload the masked vector."""
        self._expect("shared", "masked")
        me_x = share_index(self.adverts, self.node)
        seen: set[int] = set()
        for sender, ct in req.ciphertexts:
            if sender in seen:
                raise SecAggError(f"node {self.node}: duplicate share from node {sender}")
            seen.add(sender)
            if sender == self.node or sender not in self.adverts:
                raise SecAggError(f"node {self.node}: share from unknown node {sender}")
            key = _share_key(self.rid, self.c_sk, self.adverts[sender].c_pk, self.node, sender)
            try:
                pt = AESGCM(key).decrypt(ct[:12], ct[12:],
                                         _share_ad(self.rid, sender, self.node))
            except (InvalidTag, ValueError):
                raise SecAggError(f"node {self.node}: share from node {sender} failed "
                                  "authentication (tampered, misrouted or from another "
                                  "round)") from None
            x, yb, ysk = _decode_share(pt)
            if x != me_x:
                raise SecAggError(f"node {self.node}: share from node {sender} is for x={x}, "
                                  f"not this node's x={me_x}")
            self.shares[sender] = (x, yb, ysk)
        self.u2 = sorted(seen | {self.node})
        t = self.params.threshold(len(self.adverts))
        if len(self.u2) < t:
            raise SecAggError(f"only {len(self.u2)} node(s) shared keys, threshold {t}")
        k = ring_bits((a.weight for a in self.adverts.values()), bits=self.params.bits,
                      length=self.update.size)
        q, clipped = quantize(self.update, self.params)
        vec = np.concatenate([q * np.uint64(self.weight),
                              np.array([self.weight, clipped], dtype=np.uint64)])
        length = vec.size
        with np.errstate(over="ignore"):  # arithmetic mod 2^64, reduced mod 2^k below
            vec += prg(self_seed(self.rid, self.b, self.node), length)
            for peer in self.u2:
                if peer == self.node:
                    continue
                m = prg(pairwise_seed(self.rid, self.s_sk, self.adverts[peer].s_pk,
                                      self.node, peer), length)
                if self.node < peer:
                    vec += m
                else:
                    vec -= m
        vec &= _mask_of(k)
        return pack(vec, k)

    def unmask(self, req: UnmaskRequest) -> UnmaskReply:
        """Stage 4: shares of b for survivors, of s_sk for dropped nodes — never both."""
        self._expect("masked", "unmasked")
        surv, drop = set(req.survivors), set(req.dropped)
        if len(surv) != len(req.survivors) or len(drop) != len(req.dropped):
            raise SecAggError(f"node {self.node}: duplicate ids in the unmask request")
        if surv & drop:
            raise SecAggError(f"node {self.node}: nodes {sorted(surv & drop)} are listed as "
                              "both survived and dropped (would reveal their update)")
        if surv | drop != set(self.u2):
            raise SecAggError(f"node {self.node}: the unmask request does not partition the "
                              "nodes that shared keys")
        if self.node not in surv:
            raise SecAggError(f"node {self.node}: not listed among the survivors")
        t = self.params.threshold(len(self.adverts))
        if len(surv) < t:
            raise SecAggError(f"only {len(surv)} masked input(s), threshold {t}")
        return UnmaskReply(
            b_shares=[(o, self.shares[o][0], self.shares[o][1]) for o in sorted(surv)],
            sk_shares=[(o, self.shares[o][0], self.shares[o][2]) for o in sorted(drop)],
        )

    # -- persistence in the node's own state (bytes only) -------------------------------------

    def to_state(self) -> dict[str, bytes]:
        import pickle

        # Pickle is fine here: the blob is written and read by the same node process family,
        # never received from the network.
        return {"session": pickle.dumps(self)}

    @staticmethod
    def from_state(state: Mapping[str, bytes]) -> NodeSession:
        import pickle

        obj = pickle.loads(state["session"])  # noqa: S301 - the node's own state, see above
        if not isinstance(obj, NodeSession):
            raise SecAggError("corrupt secure aggregation state on this node")
        return obj


# ---------------------------------------------------------------------------------------------
# Coordinator side


@dataclass
class ServerSession:
    """The coordinator's view of one round: public keys, ciphertexts it cannot read, masked
    vectors, and finally the shares needed to remove the masks of the aggregate."""

    rid: RoundId
    params: SecAggParams
    length: int  # number of update coordinates (without the weight / clipped tail)
    adverts: dict[int, KeyAdvert] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    masked: dict[int, np.ndarray] = field(default_factory=dict)
    k: int = 64

    @property
    def threshold(self) -> int:
        return self.params.threshold(len(self.adverts))

    def share_keys_request(self, adverts: Mapping[int, KeyAdvert]) -> ShareKeysRequest:
        if len(adverts) < 3:
            raise SecAggError(f"only {len(adverts)} node(s) advertised keys: secure "
                              "aggregation needs >= 3 (with 2, each learns the other's update)")
        self.adverts = dict(adverts)
        self.k = ring_bits((a.weight for a in adverts.values()), bits=self.params.bits,
                           length=self.length)
        return ShareKeysRequest(dict(adverts))

    def route_shares(self, shares: Mapping[int, Mapping[int, bytes]]) -> dict[int, MaskRequest]:
        """Relay each node's ciphertexts to their receivers (U2 = who sent shares)."""
        u2 = sorted(n for n in shares if n in self.adverts)
        if len(u2) < self.threshold:
            raise SecAggError(f"only {len(u2)} node(s) shared keys, threshold {self.threshold}")
        self.u2 = u2
        inbox: dict[int, list[tuple[int, bytes]]] = {n: [] for n in u2}
        for sender in u2:
            for receiver, ct in shares[sender].items():
                if receiver in inbox and receiver != sender:
                    inbox[receiver].append((sender, ct))
        return {n: MaskRequest(cts) for n, cts in inbox.items()}

    def add_masked(self, node: int, data: bytes) -> None:
        if node not in self.u2:
            raise SecAggError(f"masked input from node {node}, which did not share keys")
        if node in self.masked:
            raise SecAggError(f"duplicate masked input from node {node}")
        self.masked[node] = unpack(data, self.k, self.length + 2)

    def unmask_request(self) -> UnmaskRequest:
        u3 = sorted(self.masked)
        if len(u3) < self.threshold:
            raise SecAggError(f"only {len(u3)} masked input(s), threshold {self.threshold}")
        return UnmaskRequest(u3, sorted(set(self.u2) - set(u3)))

    def aggregate(self, replies: Mapping[int, UnmaskReply]) -> Aggregate:
        u3 = sorted(self.masked)
        dropped = sorted(set(self.u2) - set(u3))
        if len(replies) < self.threshold:
            raise SecAggError(f"only {len(replies)} node(s) answered the unmask stage, "
                              f"threshold {self.threshold}")
        b_sh: dict[int, dict[int, int]] = {o: {} for o in u3}
        sk_sh: dict[int, dict[int, int]] = {o: {} for o in dropped}
        for sender, rep in replies.items():
            if sender not in u3:
                raise SecAggError(f"unmask reply from node {sender}, not a survivor")
            x_sender = share_index(self.adverts, sender)
            for kind, lst, bucket in (("b", rep.b_shares, b_sh), ("sk", rep.sk_shares, sk_sh)):
                for owner, x, y in lst:
                    if owner not in bucket:
                        raise SecAggError(f"node {sender} sent a {kind}-share for node {owner}, "
                                          "which was not requested")
                    if x != x_sender:
                        raise SecAggError(f"node {sender} sent a share at x={x}, its own x is "
                                          f"{x_sender}")
                    if x in bucket[owner]:
                        raise SecAggError(f"duplicate {kind}-share for node {owner} from node "
                                          f"{sender}")
                    bucket[owner][x] = y
        length = self.length + 2
        total = np.zeros(length, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for v in self.masked.values():
                total += v
            for owner in u3:
                b = self._reconstruct(b_sh[owner], owner, "self-mask seed")
                if commitment(self.rid, b, owner) != self.adverts[owner].b_commit:
                    raise SecAggError(f"reconstructed self-mask seed of node {owner} does not "
                                      "match its commitment (tampered shares)")
                total -= prg(self_seed(self.rid, b, owner), length)
            for d in dropped:
                sk = self._reconstruct(sk_sh[d], d, "mask key")
                if _raw_pub(X25519PrivateKey.from_private_bytes(sk)) != self.adverts[d].s_pk:
                    raise SecAggError(f"reconstructed mask key of dropped node {d} does not "
                                      "match its public key (tampered shares)")
                for k_node in u3:
                    m = prg(pairwise_seed(self.rid, sk, self.adverts[k_node].s_pk, d, k_node),
                            length)
                    # k_node added +m if k_node < d else -m: take it back out.
                    if k_node < d:
                        total -= m
                    else:
                        total += m
        total &= _mask_of(self.k)
        weight, clipped = int(total[-2]), int(total[-1])
        return Aggregate(dequantize_mean(total[:-2], weight, self.params), weight, clipped,
                         u3, dropped)

    def _reconstruct(self, shares: Mapping[int, int], owner: int, what: str) -> bytes:
        try:
            return shamir_reconstruct(shares, self.threshold)
        except SecAggError as e:
            raise SecAggError(f"cannot reconstruct the {what} of node {owner}: {e}") from None


def flatten(arrays: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[n], dtype=np.float32).ravel() for n in names])


def unflatten(vec: np.ndarray, like: Mapping[str, np.ndarray], names: list[str]
              ) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for n in names:
        ref = like[n]
        out[n] = vec[i:i + ref.size].reshape(ref.shape).astype(np.float32)
        i += ref.size
    if i != vec.size:
        raise SecAggError(f"aggregate has {vec.size} coordinates, the adapter {i}")
    return out
