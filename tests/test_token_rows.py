"""Only the new token rows of the embeddings train (OmniLMM's ``tune_mm_mlp_adapter`` /
``orig_embeds_params``): every old row stays bit-identical after AdamW steps with weight decay, in a
plain torch loop, in mmcore's loop and in HF Trainer; tied weights stay tied."""

import pytest
import torch
from rich.console import Console

from mmcore.errors import ConfigError
from mmcore.testing import tiny_multimodal_model
from mmcore.training import TrainConfig, apply_stage, param_groups, train
from mmcore.training.token_rows import embedding_weights, new_token_ids, train_token_rows


def _model(family):
    model, tokenizer = tiny_multimodal_model(family, wrap=True)
    return model, tokenizer


def _batch(model, seed):
    """Text batches that hold the start/end tokens (new rows of the input embeddings) among old ones."""
    generator = torch.Generator().manual_seed(seed)
    starts = [pair[0] for pair in model.config.modality_wrap_token_ids.values()]
    ids = torch.randint(4, 200, (2, 12), generator=generator)
    ids[:, 3] = starts[0]
    ids[:, 7] = starts[1]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _snapshot(model):
    return [w.detach().clone() for w in embedding_weights(model)]


def _check_rows(model, before, rows, *, input_rows):
    """Old rows bit-identical; the new rows the batches reach changed: the input embedding's at the
    tokens in the text, an untied head's at every new row (each logit has a gradient)."""
    old = torch.ones(before[0].shape[0], dtype=torch.bool)
    old[rows] = False
    for number, (weight, start) in enumerate(zip(embedding_weights(model), before)):
        assert torch.equal(weight.detach()[old], start[old]), "an old row moved"
        changed = input_rows if number == 0 else rows
        assert not torch.equal(weight.detach()[changed], start[changed]), "the new rows did not train"


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # llama: untied head; gpt2: tied
def test_adamw_with_weight_decay_moves_only_the_new_rows_and_keeps_ties(family):
    model, _ = _model(family)
    rows = new_token_ids(model)
    assert len(rows) == 6  # two placeholders, two start and two end tokens
    llm = model.get_base_language_model()
    tied = llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    assert tied == (family == "gpt2")
    report = apply_stage(model, "align", train_new_token_rows=True)
    assert "6 new token(s)" in str(report.notes)
    before = _snapshot(model)
    # one group, decay on everything (as a plain AdamW over the trainable parameters): the hook keeps the rows
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(4):
        model(**_batch(model, step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    starts = [pair[0] for pair in model.config.modality_wrap_token_ids.values()]
    _check_rows(model, before, rows, input_rows=starts)
    if tied:
        assert llm.get_output_embeddings().weight is llm.get_input_embeddings().weight
    else:  # the head's new rows train through the logits of every step
        assert not torch.equal(embedding_weights(model)[1].detach()[rows], before[1][rows])


def test_param_groups_never_decay_a_weight_that_trains_some_rows():
    model, _ = _model("llama")
    apply_stage(model, "align", train_new_token_rows=True)
    embed = embedding_weights(model)[0]
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    (group,) = [g for g in groups if any(p is embed for p in g["params"])]
    assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] > 0 for g in groups)  # the projectors' matrices still decay


def test_mmcore_loop_with_train_new_token_rows_and_weight_decay(tmp_path):
    model, _ = _model("llama")
    rows = new_token_ids(model)
    before = _snapshot(model)

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return index

    def collate(indices):
        return _batch(model, indices[0])

    config = TrainConfig(output_dir=str(tmp_path), stage="align", max_steps=3, batch_size=2, lr=1e-2,
                         weight_decay=0.1, train_new_token_rows=True, progress=False, device="cpu",
                         save_final=False)  # fmt: skip
    train(model, Samples(), collate, config, console=Console(quiet=True))
    starts = [pair[0] for pair in model.config.modality_wrap_token_ids.values()]
    _check_rows(model, before, rows, input_rows=starts)


def test_hf_trainer_keeps_the_old_rows_through_its_own_decaying_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = _model("llama")
    rows = new_token_ids(model)
    apply_stage(model, "align", train_new_token_rows=rows)
    before = _snapshot(model)
    samples = [{k: v[0] for k, v in _batch(model, seed).items()} for seed in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
        weight_decay=0.1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        remove_unused_columns=False,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=samples)
    trainer.train()
    decays = [g for g in trainer.optimizer.param_groups if g["weight_decay"] > 0]
    assert any(p is embedding_weights(model)[0] for g in decays for p in g["params"])  # HF decays it
    starts = [pair[0] for pair in model.config.modality_wrap_token_ids.values()]
    _check_rows(model, before, rows, input_rows=starts)


def test_remove_lets_every_row_train_again_and_bad_ids_are_refused():
    model, _ = _model("llama")
    batch = _batch(model, 0)
    row = int(batch["input_ids"][0, 0])
    others = torch.arange(embedding_weights(model)[0].shape[0]) != row
    handle = train_token_rows(model, [row])
    model(**batch).loss.backward()
    grad = embedding_weights(model)[0].grad
    assert grad[row].abs().sum() > 0 and grad[others].abs().sum() == 0
    model.zero_grad()
    handle.remove()
    model(**batch).loss.backward()
    assert embedding_weights(model)[0].grad[others].abs().sum() > 0
    with pytest.raises(ConfigError, match="outside"):
        train_token_rows(model, [10**6])


def test_mmcore_train_flag_keeps_the_old_rows_of_the_saved_model(tmp_path, demo_start):
    from typer.testing import CliRunner

    from mmcore import MultimodalModel
    from mmcore.cli.app import build_app

    start, data = demo_start
    model = MultimodalModel.from_pretrained(start)
    args = ["train", start, "--data", data, "-o", tmp_path / "run", "--stage", "align", "--steps", "2",
            "--batch-size", "2", "--lr", "1e-2", "--weight-decay", "0.1", "--train-new-token-rows", "--no-progress",
            "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(build_app(), [str(a) for a in args])
    assert result.exit_code == 0, result.output
    trained = MultimodalModel.from_pretrained(tmp_path / "run" / "model")
    rows = new_token_ids(model)
    old = torch.ones(embedding_weights(model)[0].shape[0], dtype=torch.bool)
    old[rows] = False
    moved = []
    for start, weight in zip(embedding_weights(model), embedding_weights(trained)):
        assert torch.equal(weight.detach()[old], start.detach()[old])
        moved.append(not torch.equal(weight.detach()[rows], start.detach()[rows]))
    # placeholders are replaced by features before the LLM, so their input rows get no gradient;
    # the head's rows (every logit has one) train
    assert moved[-1]


def test_a_later_stage_without_the_option_ends_the_row_masking():
    model, _ = _model("llama")
    apply_stage(model, "align", train_new_token_rows=True)
    apply_stage(model, "finetune")
    batch = _batch(model, 0)
    model(**batch).loss.backward()
    grad = embedding_weights(model)[0].grad
    assert grad[int(batch["input_ids"][0, 0])].abs().sum() > 0  # an old row trains again
    assert not hasattr(embedding_weights(model)[0], "_mmcore_trainable_rows")
