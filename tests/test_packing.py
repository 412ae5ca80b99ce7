"""Packing (several samples per row, each attending only to itself) and the token-budget sampler.

The spec: a packed batch gives every real token the loss it has when its sample runs alone (fp32,
1e-5), the loss normalisation counts the same tokens, and a training run packed takes the same
steps as one unpacked over the same samples per update.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcore import MultimodalProcessor
from mmcore.errors import ConfigError
from mmcore.testing import tiny_multimodal_model
from mmcore.training import (
    MultimodalCollator,
    TokenBudgetBatchSampler,
    TrainConfig,
    plan_rows,
    train,
)
from mmcore.training.config import cli_options

FAMILIES = ["llama", "qwen2"]


def stacked(key):
    return lambda items: {key: torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in items])}


def processor_for(model, tokenizer, vision=None):
    """Images (3, 28, 28) -> 4 tokens each, clips (8, 20) -> 10 tokens each, for the tiny model."""
    return MultimodalProcessor(
        {"vision": vision or stacked("pixel_values"), "audio": stacked("input_features")}, tokenizer, model,
        {"vision": lambda items, out: [4] * len(items), "audio": lambda items, out: [10] * len(items)},
    )  # fmt: skip


def chat(question, answer, items=""):
    return [{"role": "user", "content": items + question}, {"role": "assistant", "content": answer}]


def mixed_samples(seed=0):
    """Text-only samples beside one-image, two-image and audio ones, of different lengths."""
    g = torch.Generator().manual_seed(seed)

    def image():
        return torch.randn(3, 28, 28, generator=g)

    return [
        {"messages": chat("what is in the image ?", "a red circle", "<vision>\n"), "vision": [image()]},
        {"messages": chat("hello world , how are you ?", "one two three four five six")},
        {"messages": chat("describe the audio clip .", "a low tone", "<audio>\n"), "audio": [torch.randn(8, 20, generator=g)]},
        {"messages": chat("compare them", "a blue square , a green triangle", "<vision><vision>\n"), "vision": [image(), image()]},
        {"text": "the quick brown fox jumps over the lazy dog ."},
        {"messages": chat("and this ?", "a yellow star on a white background", "<vision>\n"), "vision": [image()]},
        {"messages": chat("what do you hear ?", "a chord", "<audio>\n"), "audio": [torch.randn(8, 20, generator=g)]},
    ]  # fmt: skip


def token_losses(model, batch):
    """Per-token losses of a batch, per sample (a segment between position-id restarts, or a row
    with its attention mask): ``[(input ids, [(position, target, loss), ...]), ...]``."""
    with torch.no_grad():
        logits = model(**batch).logits.float()
    out = []
    for row in range(batch["input_ids"].shape[0]):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        if "position_ids" in batch:
            starts = (batch["position_ids"][row] == 0).nonzero().flatten().tolist() + [len(ids)]
            segments = list(zip(starts[:-1], starts[1:]))
        else:
            segments = [(0, int(batch["attention_mask"][row].sum()))]
        for start, end in segments:
            if (labels[start:end] == -100).all():
                continue  # padding
            targets = labels[start + 1 : end]
            losses = F.cross_entropy(logits[row, start : end - 1], targets.clamp(min=0), reduction="none")
            kept = [(p, int(t), float(v)) for p, (t, v) in enumerate(zip(targets, losses)) if t != -100]
            out.append((ids[start:end].tolist(), kept))
    return out


def test_plan_rows_packs_first_fit_decreasing_and_in_order():
    assert plan_rows([5, 3, 4, 2, 6], 8) == [[3, 4], [0, 1], [2]]  # 6, 5, 4 open rows; 3 and 2 fill them
    assert plan_rows([5, 3, 4, 2, 6], 8, keep_order=True) == [[0, 1], [2, 3], [4]]
    assert plan_rows([3, 3, 6, 2], 8, keep_order=True) == [[0, 1], [2, 3]]
    assert plan_rows([3, 3, 6, 2], 8) == [[2, 3], [0, 1]]
    assert plan_rows([10, 2], 8) == [[0], [1]]  # longer than a row: a row of its own
    assert plan_rows([4, 4, 2, 2], 8) == [[0, 1], [2, 3]]  # full rows first
    assert plan_rows([4, 4, 2, 2], 8, even=True) == [[0, 2], [1, 3]]  # the same 2 rows, of 6 each
    assert plan_rows([10, 2, 3], 8, even=True) == [[0], [1, 2]]
    with pytest.raises(ConfigError, match="pack_to must be >= 1"):
        plan_rows([1], 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_tokens_have_the_losses_they_have_alone(family):
    model, tokenizer = tiny_multimodal_model(family)
    model.eval()
    processor = processor_for(model, tokenizer)
    samples = mixed_samples()
    packed = MultimodalCollator(processor, pack_to=96)(samples)
    assert "attention_mask" not in packed and packed["use_cache"] is False
    rows = packed["input_ids"].shape[0]
    assert rows < len(samples)  # several samples share rows
    alone = {}
    for sample in samples:
        (ids, losses), = token_losses(model, MultimodalCollator(processor)([sample]))
        alone[tuple(ids)] = losses
    got = token_losses(model, packed)
    assert len(got) == len(samples) and {tuple(ids) for ids, _ in got} == set(alone)
    for ids, losses in got:
        expected = alone[tuple(ids)]
        assert [(p, t) for p, t, _ in losses] == [(p, t) for p, t, _ in expected]
        torch.testing.assert_close(
            torch.tensor([v for *_, v in losses]), torch.tensor([v for *_, v in expected]), atol=1e-5, rtol=0
        )
    # the control: the same rows with one causal mask over each row (no restart of the positions)
    # give other losses, so the equality above is the block-diagonal attention's doing
    crossing = {k: v for k, v in packed.items() if k not in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k")}
    with torch.no_grad():
        assert not torch.allclose(model(**crossing).logits, model(**packed).logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_its_normalisation_count_every_token_once(family):
    model, tokenizer = tiny_multimodal_model(family)
    model.eval()
    processor = processor_for(model, tokenizer)
    samples = mixed_samples(seed=3)
    padded = MultimodalCollator(processor)(samples)
    packed = MultimodalCollator(processor, pack_to=128)(samples)
    items = (padded["labels"][:, 1:] != -100).sum()
    assert (packed["labels"][:, 1:] != -100).sum() == items  # the count the loop and Trainer take
    with torch.no_grad():
        a = model(**padded, num_items_in_batch=items).loss
        b = model(**packed, num_items_in_batch=items).loss
        c = model(**padded).loss
        d = model(**packed).loss
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    torch.testing.assert_close(d, c, atol=1e-5, rtol=0)


def test_packing_keeps_the_order_when_items_cannot_be_reordered():
    model, tokenizer = tiny_multimodal_model()
    model.eval()

    def images_with_a_batch_summary(items):  # one output that is not one row per item
        return {**stacked("pixel_values")(items), "summary": torch.zeros(1, 3)}

    processor = processor_for(model, tokenizer)
    summarised = processor_for(model, tokenizer, vision=images_with_a_batch_summary)
    samples = mixed_samples()
    packed = MultimodalCollator(summarised, pack_to=96)(samples)
    # next-fit in the given order: the samples appear in the rows as given
    segments = [ids for ids, _ in token_losses(model, {k: v for k, v in packed.items() if k != "summary"})]
    order = [MultimodalCollator(processor)([s])["input_ids"][0].tolist() for s in samples]
    assert segments == order


def test_rows_listed_row_after_row_pack_into_as_many_rows(family="llama"):
    """Samples that come as rows (what ``TokenBudgetBatchSampler(row_tokens=...)`` yields) pack into
    those rows where first-fit decreasing would open one more, and keep their losses."""
    model, tokenizer = tiny_multimodal_model(family)
    model.eval()
    processor = processor_for(model, tokenizer)
    collate_alone = MultimodalCollator(processor)
    extra = collate_alone([{"text": "the"}])["input_ids"].shape[1] - 1  # tokens a text adds beyond its words
    # in the given order two rows of 40 ([12, 20, 8], [16, 16, 8]); first-fit decreasing needs three
    wanted = [12, 20, 8, 16, 16, 8]
    assert len(plan_rows(wanted, 40)) == 3 and len(plan_rows(wanted, 40, keep_order=True)) == 2
    samples = [{"text": " ".join(["the"] * (n - extra))} for n in wanted]
    assert [collate_alone([s])["input_ids"].shape[1] for s in samples] == wanted
    packed = MultimodalCollator(processor, pack_to=40)(samples)
    assert packed["input_ids"].shape == (2, 40)
    got = token_losses(model, packed)
    expected = [token_losses(model, collate_alone([s]))[0] for s in samples]
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]  # in order, row after row
    for (_, losses), (_, alone) in zip(got, expected):
        torch.testing.assert_close(
            torch.tensor([v for *_, v in losses]), torch.tensor([v for *_, v in alone]), atol=1e-5, rtol=0
        )
    # where first-fit decreasing needs no more rows, it is what packs (as even as it can)
    assert MultimodalCollator(processor, pack_to=40)(samples[:3])["input_ids"].shape == (1, 40)


def test_packed_batch_carries_flash_attention_boundaries():
    model, tokenizer = tiny_multimodal_model()
    batch = MultimodalCollator(processor_for(model, tokenizer), pack_to=80, pad_to_multiple_of=16)(mixed_samples())
    rows, width = batch["input_ids"].shape
    assert width % 16 == 0
    flat = batch["position_ids"].reshape(-1)
    starts = (flat == 0).nonzero().flatten()
    assert batch["cu_seq_lens_q"].tolist() == starts.tolist() + [rows * width]
    assert batch["max_length_q"] == int(torch.diff(batch["cu_seq_lens_q"]).max())
    assert (batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] == -100).all()


def test_transformers_trainer_takes_the_same_steps_packed(tmp_path):
    from transformers import Trainer, TrainingArguments

    def run(pack_to):
        model, tokenizer = tiny_multimodal_model()
        model.language_model.config.use_cache = True  # as a pretrained LM comes: the batch turns it off
        # Trainer counts labels[..., 1:] only for a model whose loss_type is transformers' causal LM
        # loss; MultimodalModel has none yet, so Trainer would count position 0 of each padded row
        # (a label nothing predicts) and miss the exact normalisation. Packed rows have -100 there.
        model.loss_type = "ForCausalLM"
        args = TrainingArguments(
            output_dir=str(tmp_path / f"out{pack_to}"), per_device_train_batch_size=3, max_steps=3, logging_steps=1,
            remove_unused_columns=False, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
            learning_rate=1e-3, seed=0, data_seed=0,
        )  # fmt: skip
        collator = MultimodalCollator(processor_for(model, tokenizer), pack_to=pack_to)
        trainer = Trainer(model=model, args=args, train_dataset=mixed_samples() * 2, data_collator=collator)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e], model

    plain, plain_model = run(None)
    packed, packed_model = run(64)
    assert len(plain) == 3 and all(math.isfinite(x) for x in plain)
    # logged losses are rounded by Trainer; the weights carry the exact comparison
    assert packed == pytest.approx(plain, abs=1e-4)
    for (name, a), b in zip(plain_model.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


class Samples(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]

    def modality_key(self, i):
        return "+".join(m for m in ("audio", "vision") if m in self.samples[i]) or "text"

    def length(self, i):
        return sum(len(str(m["content"])) for m in self.samples[i].get("messages", [])) or len(self.samples[i]["text"])


@pytest.mark.parametrize("family", FAMILIES)
def test_training_packed_takes_the_steps_of_training_padded(tmp_path, family):
    def run(pack_to):
        model, tokenizer = tiny_multimodal_model(family)
        data = Samples(mixed_samples() * 2 + mixed_samples(seed=5))
        config = TrainConfig(
            output_dir=str(tmp_path / str(pack_to)), stage="full", max_steps=4, batch_size=3, grad_accum=2, lr=1e-3,
            warmup_ratio=0.0, group_by_modality=False, progress=False, save_final=False, device="cpu", seed=0,
            pack_to=pack_to,
        )  # fmt: skip
        collator = MultimodalCollator(processor_for(model, tokenizer))
        return model, train(model, data, collator, config, console=_quiet())

    plain_model, plain = run(None)
    packed_model, packed = run(72)
    assert [s for s, _ in packed.losses] == [1, 2, 3, 4]
    torch.testing.assert_close(
        torch.tensor([v for _, v in packed.losses]), torch.tensor([v for _, v in plain.losses]), atol=1e-5, rtol=0
    )
    for (name, a), b in zip(plain_model.named_parameters(), packed_model.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0, msg=name)


def _quiet():
    from rich.console import Console

    return Console(record=True, width=200)


def test_pack_to_needs_a_collator_that_packs(tmp_path):
    model, tokenizer = tiny_multimodal_model()
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, progress=False, device="cpu", pack_to=64)
    with pytest.raises(ConfigError, match="pack_to .* needs a collator that packs"):
        train(model, Samples(mixed_samples()), lambda items: items, config, console=_quiet())
    with pytest.raises(ConfigError, match="pack_to must be >= 1"):
        TrainConfig(output_dir=str(tmp_path), pack_to=0).check()


def test_train_command_has_the_packing_and_budget_options():
    flags = {o.name: o.flags for o in cli_options()}
    assert flags["pack_to"] == ("--pack-to",) and flags["batch_length"] == ("--batch-length",)
    assert flags["group_by_modality"] == ("--group-by-modality/--no-group-by-modality",)


# -- the token-budget sampler --------------------------------------------------------------------------------
def test_token_budget_batches_hold_about_the_budget_each():
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(400, generator=g) * 0.6 + 5).long().clamp(20, 900).tolist()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=2048, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400))  # one process: every sample once
    totals = [sum(lengths[i] for i in b) for b in batches]
    assert max(totals) <= 2048
    assert sum(totals) / (len(totals) * 2048) > 0.95  # nearly full: first-fit decreasing in windows
    assert len({len(b) for b in batches}) > 1  # the sample count varies, the token count does not
    assert list(sampler) == batches and len(sampler) == len(batches)  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_token_budget_batches_of_several_rows_pad_little():
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(400, generator=g) * 0.6 + 5).long().clamp(20, 700).tolist()
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=2048, row_tokens=512, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(400))  # every sample once
    tokens = 0
    for batch in batches:
        rows = plan_rows([lengths[i] for i in batch], 512, keep_order=True)  # what the collator falls back to
        assert len(rows) <= 4  # the batch's rows, listed row after row
        widths = [sum(lengths[batch[k]] for k in row) for row in rows]
        assert max(widths) <= max(512, max(lengths[i] for i in batch))
        tokens += len(rows) * max(widths)  # the (rows, W) batch
    assert (tokens - sum(lengths)) / tokens < 0.05  # rows of similar fill together: padding under 5 %
    one_row = list(TokenBudgetBatchSampler(lengths, max_tokens=2048, seed=1))
    assert len(batches) <= len(one_row) + 1  # about as many batches as one row of 2048 each
    assert list(sampler) == batches  # seeded
    with pytest.raises(ConfigError, match="tokens of a packed row must be between 1 and the batch's budget 2048"):
        TokenBudgetBatchSampler(lengths, 2048, row_tokens=4096)
    # two ranks: each step's batches of rows split across them, none shared
    ranks = [TokenBudgetBatchSampler(lengths, 2048, row_tokens=512, world_size=2, rank=r, seed=1) for r in (0, 1)]
    first, second = (list(r) for r in ranks)
    assert len(first) == len(second) > 0 and not {i for b in first for i in b} & {i for b in second for i in b}


def test_token_budget_groups_by_modality_and_splits_steps_across_ranks():
    lengths = [50 + (i * 37) % 300 for i in range(120)]
    groups = ["vision" if i % 3 else "text" for i in range(120)]
    whole = TokenBudgetBatchSampler(lengths, 600, groups=groups, world_size=2, rank=0, seed=4)
    ranks = [TokenBudgetBatchSampler(lengths, 600, groups=groups, world_size=2, rank=r, seed=4) for r in (0, 1)]
    steps = list(zip(*ranks))
    assert len(steps) == len(whole) > 0
    for first, second in steps:
        assert len({groups[i] for i in first + second}) == 1  # each step: one group on every rank
        assert sum(lengths[i] for i in first) <= 600 and sum(lengths[i] for i in second) <= 600
    assert not set(i for s in steps for i in s[0]) & set(i for s in steps for i in s[1])


def test_token_budget_sampler_from_a_dataset_and_in_a_dataloader():
    data = Samples(mixed_samples())
    sampler = TokenBudgetBatchSampler.for_dataset(data, 120, group_by_modality=False)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=lambda items: items)
    seen = [s for batch in loader for s in batch]
    assert len(seen) == len(data)
    grouped = TokenBudgetBatchSampler.for_dataset(data, 120)
    assert all(len({data.modality_key(i) for i in b}) == 1 for b in grouped)
    with pytest.raises(ConfigError, match="has no length"):
        TokenBudgetBatchSampler.for_dataset([1, 2], 10)
    with pytest.raises(ConfigError, match="no modality group fills"):
        TokenBudgetBatchSampler([5, 5], 10, world_size=4)


def test_transformers_trainer_takes_batches_from_the_token_budget_sampler(tmp_path):
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainingArguments

    model, tokenizer = tiny_multimodal_model()
    data = Samples(mixed_samples() * 2)
    sampler = TokenBudgetBatchSampler.for_dataset(data, 120, seed=0)
    seen = []

    class BudgetTrainer(Trainer):  # as docs/training.md shows it
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator)

    collator = MultimodalCollator(processor_for(model, tokenizer), pack_to=128)

    def collate(items):
        seen.append(len(items))
        return collator(items)

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, logging_steps=1, remove_unused_columns=False, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = BudgetTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.train()
    assert seen[:3] == [len(b) for b in list(sampler)[:3]]
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.parametrize("family", FAMILIES[:1])
def test_training_by_a_length_budget_packed(tmp_path, family):
    model, tokenizer = tiny_multimodal_model(family)
    data = Samples(mixed_samples() * 2)
    config = TrainConfig(
        output_dir=str(tmp_path), stage="finetune", max_steps=3, batch_length=120, pack_to=128, lr=1e-3,
        progress=False, save_final=False, device="cpu", log_every=1,
    )  # fmt: skip
    console = _quiet()
    result = train(model, data, MultimodalCollator(processor_for(model, tokenizer)), config, console=console)
    assert [s for s, _ in result.losses] == [1, 2, 3] and all(math.isfinite(v) for _, v in result.losses)
    assert "batches of up to 120 length per step" in console.export_text()


def test_training_by_a_length_budget_in_rows_of_pack_to(tmp_path):
    """--batch-length larger than --pack-to: each micro-batch is several rows of pack_to tokens."""
    model, tokenizer = tiny_multimodal_model()
    data = Samples(mixed_samples() * 4)
    data.length = lambda i: MultimodalCollator(processor_for(model, tokenizer))([data[i]])["input_ids"].shape[1]
    shapes = []

    class Recording(MultimodalCollator):
        def __call__(self, samples):
            batch = super().__call__(samples)
            shapes.append(tuple(batch["input_ids"].shape))
            return batch

    config = TrainConfig(
        output_dir=str(tmp_path), stage="finetune", max_steps=3, batch_length=128, pack_to=64, lr=1e-3,
        progress=False, save_final=False, device="cpu", log_every=1, group_by_modality=False,
    )  # fmt: skip
    result = train(model, data, Recording(processor_for(model, tokenizer)), config, console=_quiet())
    assert [s for s, _ in result.losses] == [1, 2, 3] and all(math.isfinite(v) for _, v in result.losses)
    assert shapes and all(rows <= 2 and width <= 64 for rows, width in shapes)
    assert any(rows == 2 for rows, _ in shapes)


def test_train_command_packs_and_batches_by_length(tmp_path, demo_start):
    from typer.testing import CliRunner

    from mmcore.cli.app import build_app

    start, data = demo_start
    result = CliRunner().invoke(build_app(), [
        "train", str(start), "--data", str(data), "--stage", "finetune", "-o", str(tmp_path / "run"),
        "--batch-length", "100", "--pack-to", "128", "--steps", "2", "--log-every", "1", "--no-progress",
        "--device", "cpu", "--no-group-by-modality",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert "packed into rows of up to 128 tokens" in said and "batches of up to 100 length" in said
    assert "modalities mixed in a batch" in said
    assert "step 2/2 loss" in said


def test_jsonl_lengths_are_the_tokens_the_collator_makes(tmp_path):
    pytest.importorskip("mmcore_plugin_clip")
    pytest.importorskip("mmcore_plugin_whisper")
    from mmcore.demo import build_model, make_dataset
    from mmcore.training import ConversationDataset
    from mmcore.training.data import registered_loaders

    torch.manual_seed(0)
    model, processor = build_model(llm_width=32)
    dataset = ConversationDataset(make_dataset(tmp_path / "data", 1, seed=0, name="train"), loaders=registered_loaders())
    records = dataset.records
    # a text-only sample and a two-image one beside the demo's one-item samples
    records.append({"id": "t", "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello"}]})
    images = [r["image"] for r in records if r.get("image")][:2]
    records.append({"id": "m", "image": images, "conversations": [{"from": "human", "value": "<image> and <image>?"},
                                                                    {"from": "gpt", "value": "two shapes"}]})  # fmt: skip
    collator = MultimodalCollator(processor)
    chars = [dataset.length(i) for i in range(len(dataset))]
    per_item = dataset.use_token_lengths(collator)
    assert set(per_item) == {"vision", "audio"} and min(per_item.values()) > 1
    for i in range(len(dataset)):  # fixed-size image and equal-length clips: the estimate is exact
        assert dataset.length(i) == collator([dataset[i]])["input_ids"].shape[1], records[i]["id"]
    assert [dataset.length(i) for i in range(len(dataset))] != chars
