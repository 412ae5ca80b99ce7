import mmcore
import torch
from mmcore.testing import check_encoder_plugin, tiny_llm, tiny_tokenizer


def test_contract(tmp_path):
    report = check_encoder_plugin("imu", preset="tiny", tmp_path=tmp_path, meta_presets=True)
    assert report.tokens_per_item == [20, 20]  # 200 samples / patch 10


def test_window_option_changes_token_count():
    encoder = mmcore.build_encoder("imu", preset="tiny", window=50)
    assert encoder(imu_values=torch.randn(1, 6, 50)).shape == (1, 5, 32)


def test_assembled_model_trains_on_processed_clips():
    encoder = mmcore.build_encoder("imu", preset="tiny")
    tokenizer = tiny_tokenizer()
    model = mmcore.MultimodalModel({"imu": encoder}, tiny_llm(vocab_size=len(tokenizer)))
    ids = mmcore.add_modality_tokens(tokenizer, model)
    processed = mmcore.get_factory("imu").processor(encoder.source["recipe"])([torch.randn(120, 6)])
    input_ids = torch.tensor([[1] + [ids["imu"]] * 20 + [5, 6]])
    out = model(input_ids=input_ids, labels=input_ids, **processed)
    assert torch.isfinite(out.loss)
