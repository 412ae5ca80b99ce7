import mmcore
import torch
from mmcore.testing import check_encoder_plugin
from mmcore.testing.suite import EncoderSuite


class TestImuSuite(EncoderSuite):  # the shared suite, for every encoder this plugin registers
    plugin = "imu"
    option_variants = {"imu": [{"window": 50}]}


def test_contract(tmp_path):
    report = check_encoder_plugin("imu", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.tokens_per_item == [20, 20]  # 200 samples / patch 10


def test_window_option_changes_token_count():
    encoder = mmcore.build_encoder("imu", preset="tiny", window=50)
    assert encoder(imu_values=torch.randn(1, 6, 50)).shape == (1, 5, 32)
