"""The SecAgg+ protocol, run whole in one process: reconstruction, thresholds, mask
cancellation, dropouts at every stage, tampered / duplicate / replayed messages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.secagg import (
    PRIME,
    MaskRequest,
    NodeSession,
    RoundId,
    SecAggError,
    SecAggParams,
    ServerSession,
    UnmaskReply,
    UnmaskRequest,
    dequantize_mean,
    pack,
    quantize,
    ring_bits,
    shamir_reconstruct,
    shamir_split,
    unpack,
)

RID = RoundId("run-test", 1)
PARAMS = SecAggParams(clip=0.5, bits=16)


def clear_fedavg(updates: dict[int, np.ndarray], weights: dict[int, int],
                 clip: float) -> np.ndarray:
    tot = sum(weights[i] for i in updates)
    return sum(np.clip(updates[i].astype(np.float64), -clip, clip) * weights[i]
               for i in updates) / tot


def run_protocol(updates: dict[int, np.ndarray], weights: dict[int, int], *,
                 params: SecAggParams = PARAMS, drop_before_share: set[int] = frozenset(),
                 drop_before_mask: set[int] = frozenset(),
                 drop_before_unmask: set[int] = frozenset(), tamper=None):
    """Run all four stages; nodes in drop_* stop answering before that stage."""
    length = next(iter(updates.values())).size
    server = ServerSession(RID, params, length)
    sessions, adverts = {}, {}
    for nid, x in updates.items():
        sessions[nid], adverts[nid] = NodeSession.start(RID, nid, params=params, update=x,
                                                        weight=weights[nid])
    req = server.share_keys_request(adverts)
    shares = {nid: sessions[nid].share_keys(req) for nid in sessions
              if nid not in drop_before_share}
    if tamper:
        tamper(shares)
    inbox = server.route_shares(shares)
    masked = {nid: sessions[nid].masked_input(inbox[nid]) for nid in inbox
              if nid not in drop_before_mask}
    for nid, data in masked.items():
        server.add_masked(nid, data)
    ureq = server.unmask_request()
    replies = {nid: sessions[nid].unmask(ureq) for nid in ureq.survivors
               if nid not in drop_before_unmask}
    return server.aggregate(replies), server, sessions, masked


def make_updates(n: int, length: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = [int(rng.integers(1, 2**63)) for _ in range(n)]  # Flower-like big ids
    ups = {i: rng.normal(0, 0.1, length).astype(np.float32) for i in ids}
    ws = {i: int(rng.integers(1, 1000)) for i in ids}
    return ups, ws


def test_shamir_reconstructs_with_threshold_and_not_below():
    secret = bytes(range(32))
    shares = shamir_split(secret, [1, 2, 3, 4, 5], 3)
    for subset in ([1, 2, 3], [2, 4, 5], [1, 3, 4, 5]):
        assert shamir_reconstruct({x: shares[x] for x in subset}, 3) == secret
    with pytest.raises(SecAggError, match="2 share"):
        shamir_reconstruct({1: shares[1], 2: shares[2]}, 3)
    # t - 1 shares carry no information: any secret is consistent with them; a wrong third
    # share yields a different "secret", which the protocol catches by its commitment.
    wrong = {1: shares[1], 2: shares[2], 3: (shares[3] + 1) % PRIME}
    try:
        assert shamir_reconstruct(wrong, 3) != secret
    except SecAggError as e:  # most likely: the result is not a 256-bit number
        assert "out of range" in str(e)
    # An extra inconsistent share is detected.
    with pytest.raises(SecAggError, match="inconsistent"):
        shamir_reconstruct({**{x: shares[x] for x in (1, 2, 3)}, 4: shares[4] ^ 1}, 3)


def test_masks_cancel_and_fedavg_matches_within_quantisation_error():
    ups, ws = make_updates(5)
    agg, server, _, masked = run_protocol(ups, ws)
    expected = clear_fedavg(ups, ws, PARAMS.clip)
    assert agg.total_weight == sum(ws.values())
    assert agg.dropped == [] and agg.aggregated == sorted(ups)
    err = np.abs(agg.mean - expected).max()
    assert err <= PARAMS.step / 2 + 1e-12
    assert server.k == ring_bits(ws.values(), bits=16, length=500)
    assert len(next(iter(masked.values()))) == (500 + 2) * server.k // 8


def test_clipping_is_counted_in_the_aggregate():
    ups, ws = make_updates(3, length=50)
    first = next(iter(ups))
    ups[first][:7] = 3.0  # > clip
    agg, *_ = run_protocol(ups, ws)
    assert agg.clipped == 7
    assert np.abs(agg.mean - clear_fedavg(ups, ws, PARAMS.clip)).max() <= PARAMS.step / 2 + 1e-12


def test_masked_input_is_uncorrelated_with_the_clear_update():
    ups, ws = make_updates(4, length=20_000)
    _, server, _, masked = run_protocol(ups, ws)
    for nid, data in masked.items():
        y = unpack(data, server.k, 20_002)[:-2].astype(np.float64)
        r = np.corrcoef(y, ups[nid].astype(np.float64))[0, 1]
        assert abs(r) < 0.05, (nid, r)


@pytest.mark.parametrize("stage", ["share", "mask", "unmask"])
def test_round_survives_a_dropout_at_each_stage(stage):
    ups, ws = make_updates(5)
    victim = sorted(ups)[2]
    kw = {f"drop_before_{stage}": {victim}}
    agg, *_ = run_protocol(ups, ws, **kw)
    # A node that uploaded and then died is still aggregated.
    expected_nodes = ups if stage == "unmask" else {k: v for k, v in ups.items() if k != victim}
    assert agg.aggregated == sorted(expected_nodes)
    assert agg.dropped == ([victim] if stage == "mask" else [])
    assert agg.total_weight == sum(ws[i] for i in expected_nodes)
    assert np.abs(agg.mean - clear_fedavg(expected_nodes, ws, PARAMS.clip)).max() \
        <= PARAMS.step / 2 + 1e-12


def test_two_uploaded_dropouts_below_threshold_fail_clearly():
    ups, ws = make_updates(4)  # t = ceil(8/3) = 3
    ids = sorted(ups)
    with pytest.raises(SecAggError, match="only 2 masked input"):
        run_protocol(ups, ws, drop_before_mask={ids[0], ids[1]})
    with pytest.raises(SecAggError, match="only 2 node"):
        run_protocol(ups, ws, drop_before_unmask={ids[0], ids[1]})


def test_tampered_share_is_rejected():
    ups, ws = make_updates(3)
    a, b = sorted(ups)[:2]

    def flip(shares):
        ct = bytearray(shares[a][b])
        ct[20] ^= 1
        shares[a][b] = bytes(ct)

    with pytest.raises(SecAggError, match=f"share from node {a} failed authentication"):
        run_protocol(ups, ws, tamper=flip)


def test_misrouted_share_is_rejected():
    ups, ws = make_updates(3)
    a, b, c = sorted(ups)

    def swap(shares):  # a's share for c delivered to b
        shares[a][b] = shares[a][c]

    with pytest.raises(SecAggError, match="failed authentication"):
        run_protocol(ups, ws, tamper=swap)


def test_duplicate_share_and_replay_are_rejected():
    ups, ws = make_updates(3)
    params = PARAMS
    server = ServerSession(RID, params, 500)
    sess, adv = {}, {}
    for nid, x in ups.items():
        sess[nid], adv[nid] = NodeSession.start(RID, nid, params=params, update=x,
                                                weight=ws[nid])
    req = server.share_keys_request(adv)
    shares = {nid: s.share_keys(req) for nid, s in sess.items()}
    inbox = server.route_shares(shares)
    a = sorted(ups)[0]
    dup = MaskRequest(inbox[a].ciphertexts + inbox[a].ciphertexts[:1])
    with pytest.raises(SecAggError, match="duplicate share"):
        dataclasses.replace(sess[a]).masked_input(dup)
    with pytest.raises(SecAggError, match="replayed or out-of-order"):
        sess[a].share_keys(req)  # second share_keys for the same round
    for nid in ups:
        server.add_masked(nid, sess[nid].masked_input(inbox[nid]))
    with pytest.raises(SecAggError, match="duplicate masked input"):
        server.add_masked(a, b"")
    ureq = server.unmask_request()
    replies = {nid: sess[nid].unmask(ureq) for nid in ups}
    r = replies[a]
    bad = {**replies, a: UnmaskReply(r.b_shares + r.b_shares[:1], r.sk_shares)}
    with pytest.raises(SecAggError, match="duplicate b-share"):
        server.aggregate(bad)
    # A share changed in transit is caught by the commitment check.
    o, x, y = r.b_shares[0]
    forged = {**replies, a: UnmaskReply([(o, x, (y + 1) % PRIME)] + r.b_shares[1:], [])}
    with pytest.raises(SecAggError, match="commitment|inconsistent|out of range"):
        server.aggregate(forged)


def test_node_refuses_to_reveal_both_shares_of_one_node():
    ups, ws = make_updates(3)
    ids = sorted(ups)
    server = ServerSession(RID, PARAMS, 500)
    sess, adv = {}, {}
    for nid, x in ups.items():
        sess[nid], adv[nid] = NodeSession.start(RID, nid, params=PARAMS, update=x,
                                                weight=ws[nid])
    req = server.share_keys_request(adv)
    inbox = server.route_shares({nid: s.share_keys(req) for nid, s in sess.items()})
    for nid in ids:
        sess[nid].masked_input(inbox[nid])
    with pytest.raises(SecAggError, match="both survived and dropped"):
        sess[ids[0]].unmask(UnmaskRequest(ids, [ids[1]]))
    with pytest.raises(SecAggError, match="does not partition"):
        sess[ids[1]].unmask(UnmaskRequest([ids[0], ids[1]], []))
    # A refused request burns the stage: no second try with another partition.
    with pytest.raises(SecAggError, match="replayed or out-of-order"):
        sess[ids[0]].unmask(UnmaskRequest(ids, []))


def test_wrong_round_id_cannot_decrypt():
    ups, ws = make_updates(3)
    ids = sorted(ups)
    sess, adv = {}, {}
    for nid, x in ups.items():
        rid = RID if nid != ids[0] else RoundId("run-test", 2)  # a node from another round
        sess[nid], adv[nid] = NodeSession.start(rid, nid, params=PARAMS, update=x,
                                                weight=ws[nid])
    server = ServerSession(RID, PARAMS, 500)
    req = server.share_keys_request(adv)
    inbox = server.route_shares({nid: s.share_keys(req) for nid, s in sess.items()})
    with pytest.raises(SecAggError, match="another round|failed authentication"):
        sess[ids[1]].masked_input(inbox[ids[1]])


def test_too_few_nodes_and_bad_params_are_refused():
    ups, ws = make_updates(2)
    server = ServerSession(RID, PARAMS, 500)
    adv = {nid: NodeSession.start(RID, nid, params=PARAMS, update=x, weight=ws[nid])[1]
           for nid, x in ups.items()}
    with pytest.raises(SecAggError, match="needs >= 3"):
        server.share_keys_request(adv)
    with pytest.raises(ValueError, match="threshold_fraction"):
        SecAggParams(threshold_fraction=0.5)
    with pytest.raises(ValueError, match="bits"):
        SecAggParams(bits=40)
    assert [SecAggParams().threshold(n) for n in (3, 4, 10)] == [2, 3, 7]


def test_ring_is_sized_so_the_sum_cannot_wrap():
    assert ring_bits([100, 200], bits=16, length=10) == 32  # 300 * 65535 < 2^32
    assert ring_bits([70_000], bits=16, length=10) == 40   # 70000 * 65535 > 2^32
    q = np.array([0, 1, 2**40 - 1], dtype=np.uint64)
    assert (unpack(pack(q, 40), 40, 3) == q).all()


def test_node_state_round_trips():
    ups, ws = make_updates(3)
    nid = next(iter(ups))
    sess, _ = NodeSession.start(RID, nid, params=PARAMS, update=ups[nid], weight=ws[nid])
    back = NodeSession.from_state(sess.to_state())
    assert back.b == sess.b and back.s_sk == sess.s_sk and (back.update == sess.update).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=1, max_size=40),
       st.integers(2, 24), st.integers(1, 10_000))
def test_quantisation_error_is_at_most_half_a_step(xs, bits, w):
    params = SecAggParams(clip=1.0, bits=bits)
    x = np.array(xs, dtype=np.float32)
    q, clipped = quantize(x, params)
    assert clipped == int((np.abs(x) > 1.0).sum())
    back = dequantize_mean(q * np.uint64(w), w, params)
    assert np.abs(back - np.clip(x, -1, 1)).max() <= params.step / 2 + 1e-9


def test_config_section_defaults_off_and_needs_three_nodes():
    from fedllm.config import ConfigError, load_config

    assert load_config(None).secagg.enabled is False
    cfg = load_config(None, {"secagg.enabled": True, "secagg.bits": 16})
    assert cfg.secagg.bits == 16 and cfg.secagg.threshold_fraction == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="secagg.enabled needs at least 3 nodes"):
        load_config(None, {"secagg.enabled": True, "federation.num_nodes": 2})
    with pytest.raises(ConfigError, match="threshold_fraction"):
        load_config(None, {"secagg.threshold_fraction": 0.5})


def test_flower_records_round_trip_the_stage_messages():
    """The Flower encodings of server/secagg.py carry every stage losslessly (uint64 ids,
    521-bit shares), so the protocol over records equals the protocol in memory."""
    from server.secagg import (
        mask_content,
        mask_request_from,
        masked_content,
        unmask_reply_from,
        unmask_reply_to,
    )

    ups, ws = make_updates(3)
    ids = sorted(ups)
    server = ServerSession(RID, PARAMS, 500)
    sess, adv = {}, {}
    for nid, x in ups.items():
        sess[nid], adv[nid] = NodeSession.start(RID, nid, params=PARAMS, update=x,
                                                weight=ws[nid])
    req = server.share_keys_request(adv)
    inbox = server.route_shares({nid: s.share_keys(req) for nid, s in sess.items()})
    for nid in ids:
        m = mask_request_from(mask_content(inbox[nid])["inbox"])
        assert m == inbox[nid]
        data = sess[nid].masked_input(m)
        back = masked_content(data)["masked"]["y"].numpy().tobytes()
        assert back == data
        server.add_masked(nid, back)
    ureq = server.unmask_request()
    replies = {nid: unmask_reply_from(unmask_reply_to(sess[nid].unmask(ureq))) for nid in ids}
    agg = server.aggregate(replies)
    assert np.abs(agg.mean - clear_fedavg(ups, ws, PARAMS.clip)).max() <= PARAMS.step / 2 + 1e-12
