"""server/messages.py: requests and replies survive the Flower RecordDict round trip."""

import numpy as np

from fedllm.config import load_config
from fedllm.protocol import PHASE_CENTER, PHASE_TRAIN, STATS_KEY, TrainRequest
from server.messages import content_to_request, request_to_content


def test_train_and_centre_requests_round_trip():
    cfg = load_config(None, {"privacy.center_noise_multiplier": 15.0})
    center = np.linspace(-1, 1, 384, dtype=np.float32)
    arrays = {"head.weight": np.ones((2, 384), np.float32)}
    train = TrainRequest("run-a", 2, cfg, ("0", "1"), arrays, feature_center=center)
    back = content_to_request(request_to_content(train))
    assert (back.run_id, back.round, back.phase, back.label_names) == \
        ("run-a", 2, PHASE_TRAIN, ("0", "1"))
    assert back.config == cfg and back.config.privacy.center_noise_multiplier == 15.0
    np.testing.assert_array_equal(back.feature_center, center)
    np.testing.assert_array_equal(back.arrays["head.weight"], arrays["head.weight"])
    plain = content_to_request(request_to_content(
        TrainRequest("run-a", 1, cfg, ("0", "1"), arrays)))
    assert plain.feature_center is None and plain.phase == PHASE_TRAIN
    zeros = {STATS_KEY: np.zeros((2, 385), np.float32)}
    release = content_to_request(request_to_content(
        TrainRequest("run-a", 0, cfg, ("0", "1"), zeros, phase=PHASE_CENTER)))
    assert release.phase == PHASE_CENTER and release.round == 0
    assert set(release.arrays) == {STATS_KEY} and release.feature_center is None
    assert release.arrays[STATS_KEY].shape == (2, 385)
