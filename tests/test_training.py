"""Training building blocks: stages and LR groups, LoRA save/merge, the collator, data, sampler, the
loop (resume), transformers.Trainer, and the ``mmcore train`` command."""

import json
import math
import random
import re
import warnings

import pytest
import torch
from rich.console import Console

from mmcore import MultimodalModel
from mmcore.errors import ConfigError
from mmcore.testing import tiny_multimodal_model
from mmcore.training import (
    ConversationDataset,
    DataFormatError,
    GroupedBatchSampler,
    MultimodalCollator,
    TrainConfig,
    apply_stage,
    merge_lora,
    param_groups,
    read_jsonl,
    train,
)
from mmcore.training.data import load_audio, save_wav

IMG = (1, 3, 28, 28)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def vision_ids(model, *text):
    return torch.tensor([[5, *[model.config.modality_token_ids["vision"]] * 4, *text]])


# -- stages ---------------------------------------------------------------------------------------------
def test_stages_choose_what_trains_and_report_it(tiny):
    model, _ = tiny
    report = apply_stage(model, "align")
    names = trainable_names(model)
    assert names and all(".projector." in n for n in names)
    assert {n.split(".")[1] for n in names} == {"vision", "audio"}
    assert report.as_dict()["parts"]["language_model"]["trainable"] == 0
    assert (
        report.as_dict()["parts"]["vision.projector"]["trainable"]
        == report.as_dict()["parts"]["vision.projector"]["total"]
    )

    apply_stage(model, "finetune")
    names = trainable_names(model)
    assert any(n.startswith("language_model.") for n in names)
    assert not any(".module." in n for n in names)  # encoders stay frozen

    report = apply_stage(model, "full")
    assert trainable_names(model) == {n for n, _ in model.named_parameters()}
    assert report.trainable == report.total == sum(p.numel() for p in model.parameters())


def test_stage_report_renders_as_a_table(tiny):
    model, _ = tiny
    console = Console(record=True, width=120)
    console.print(apply_stage(model, "align"))
    text = console.export_text()
    for part in ("vision.module", "vision.projector", "audio.projector", "language_model", "all"):
        assert part in text
    assert "stage 'align'" in text


def test_lora_stage_trains_adapters_and_projectors_only(tiny):
    pytest.importorskip("peft")
    model, _ = tiny
    report = apply_stage(model, "lora", lora_r=4, lora_on_encoders=True)
    names = trainable_names(model)
    assert names == {n for n in names if "lora_" in n or ".projector." in n}
    assert any(n.startswith("language_model.") and "lora_" in n for n in names)
    assert any(n.startswith("encoders.vision.module.") and "lora_" in n for n in names)
    assert (
        0
        < report.as_dict()["parts"]["language_model"]["trainable"]
        < report.as_dict()["parts"]["language_model"]["total"]
    )
    again = apply_stage(model, "lora", lora_r=4)  # the adapters are reused, not stacked
    assert again.as_dict()["parts"]["language_model"] == report.as_dict()["parts"]["language_model"]


def test_lora_wrapping_and_reloading_raise_no_future_warning(tiny, tmp_path):
    # peft's wrapper reads transformers' deprecated is_gradient_checkpointing; mmcore's calls are quiet
    pytest.importorskip("peft")
    model, _ = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        apply_stage(model, "lora", lora_r=4)
        model.save_pretrained(tmp_path / "lora")
        type(model).from_pretrained(tmp_path / "lora")


def test_unknown_stage_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="unknown training stage 'pretrain'.*align, lora, finetune, full"):
        apply_stage(tiny[0], "pretrain")


def test_param_groups_split_projectors_and_weight_decay(tiny):
    model, _ = tiny
    apply_stage(model, "finetune")
    groups = param_groups(model, lr=1e-4, projector_lr=1e-3, weight_decay=0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"projector", "projector_no_decay", "rest", "rest_no_decay"}
    assert by_name["projector"]["lr"] == by_name["projector_no_decay"]["lr"] == 1e-3
    assert by_name["rest"]["lr"] == 1e-4 and by_name["rest"]["weight_decay"] == 0.1
    assert by_name["rest_no_decay"]["weight_decay"] == 0.0
    projector_ids = {id(p) for e in model.encoders.values() for p in e.projector.parameters()}
    assert {id(p) for g in groups if g["name"].startswith("projector") for p in g["params"]} == projector_ids
    assert all(p.dim() >= 2 for p in by_name["rest"]["params"])
    assert sum(len(g["params"]) for g in groups) == len(trainable_names(model))
    apply_stage(model, "align")
    assert [g["name"] for g in param_groups(model, lr=1e-4)] == ["projector_no_decay"]
    model.set_trainable({"*": False})
    with pytest.raises(ConfigError, match="no trainable parameters"):
        param_groups(model, lr=1e-4)


# -- LoRA: one directory, merge -------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2 ties its embeddings
def test_lora_model_saves_to_one_directory_reloads_and_merges(tmp_path, family):
    pytest.importorskip("peft")
    model, _ = tiny_multimodal_model(family=family)
    apply_stage(model, "lora", lora_r=4, lora_on_encoders=True)
    with torch.no_grad():  # as after training: adapters and projectors away from their init
        for name, param in model.named_parameters():
            if "lora_B" in name or ".projector." in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.eval()
    batch = dict(input_ids=vision_ids(model, 6, 7), pixel_values=torch.randn(IMG))
    with torch.no_grad():
        reference = model(**batch).logits

    model.save_pretrained(tmp_path / "lora")
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    saved = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert saved["peft_config"]["default"]["r"] == 4
    assert saved["encoders"]["vision"]["peft_config"]["default"]["r"] == 4
    loaded = MultimodalModel.from_pretrained(tmp_path / "lora").eval()
    assert type(loaded.language_model).__name__ == "PeftModel"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reference)

    merged = merge_lora(loaded)
    assert type(merged.language_model).__name__ == type(model.get_base_language_model()).__name__
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(**batch).logits
    torch.testing.assert_close(merged_logits, reference, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path / "plain")
    plain_config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain_config.get("peft_config") is None and "peft_config" not in plain_config["encoders"]["vision"]
    plain = MultimodalModel.from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, merged_logits)


# -- data, collator, sampler -------------------------------------------------------------------------------
@pytest.fixture
def plugin_model():
    """Tiny CLIP + Whisper (plugin presets) + tiny Llama, with its MultimodalProcessor."""
    pytest.importorskip("mmcore_plugin_clip")
    pytest.importorskip("mmcore_plugin_whisper")
    from mmcore.demo import build_model

    torch.manual_seed(0)
    return build_model(llm_width=32)


def write_data(root, n=4):
    """A small JSONL data set (demo pictures and clips) under ``root``."""
    from mmcore.demo import make_dataset

    return make_dataset(root, n, seed=0, name="train")


def test_collator_masks_the_prompt_and_placeholders(plugin_model):
    from PIL import Image

    model, processor = plugin_model
    tokenizer = processor.tokenizer
    conversation = [
        {"role": "user", "content": "<vision>\nwhat shape is it?"},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": "and the colour?"},
        {"role": "assistant", "content": "red"},
    ]
    samples = [
        {"messages": conversation, "vision": [Image.new("RGB", (40, 40), "red")]},
        {"messages": [{"role": "user", "content": "<audio> what is it?"}, {"role": "assistant", "content": "a chord"}],
         "audio": [(torch.randn(3200), 16000)]},
    ]  # fmt: skip
    batch = MultimodalCollator(processor)(samples)
    assert batch["pixel_values"].shape[0] == 1 and batch["input_features"].shape[0] == 1
    learned = [tokenizer.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert learned == [" a red circle\n red\n", " a chord\n"]
    ids = processor.token_ids
    assert (batch["input_ids"] == ids["vision"]).sum() == 4 and (
        batch["input_ids"] == ids["audio"]
    ).sum() == 10
    assert not torch.isin(batch["labels"], torch.tensor(list(ids.values()))).any()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert torch.isfinite(model(**batch).loss)

    everything = MultimodalCollator(processor, train_on="all")(samples[1:])
    kept = everything["labels"][0][everything["labels"][0] != -100]
    assert tokenizer.decode(kept).startswith("user:") and len(kept) == everything["attention_mask"].sum() - 10


def test_collator_refuses_a_sample_with_nothing_to_learn(plugin_model):
    _, processor = plugin_model
    with pytest.raises(ConfigError, match="no assistant turn"):
        MultimodalCollator(processor)([{"messages": [{"role": "user", "content": "hi"}]}])


def test_jsonl_dataset_reads_llava_conversations(tmp_path, plugin_model):
    _, processor = plugin_model
    save_wav(tmp_path / "a.wav", torch.sin(torch.arange(3200) / 5.0) * 0.5, 16000)
    from PIL import Image

    Image.new("RGB", (30, 30), "blue").save(tmp_path / "i.png")
    lines = [
        {"id": "1", "image": "i.png", "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "2", "audio": "a.wav", "conversations": [{"from": "human", "value": "listen"}, {"from": "gpt", "value": "a tone"}]},
    ]  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    dataset = ConversationDataset(tmp_path / "d.jsonl")
    first, second = dataset[0], dataset[1]
    assert first["messages"][0] == {"role": "user", "content": "<vision>\nwhat?"}
    assert first["vision"][0].size == (30, 30)
    assert second["messages"][0]["content"] == "<audio>\nlisten"  # no marker: the item goes first
    wave, rate = second["audio"][0]
    assert rate == 16000 and wave.shape == (3200,)
    assert [dataset.modality_key(i) for i in range(2)] == ["vision", "audio"]
    batch = MultimodalCollator(processor)([first, second])
    assert batch["input_ids"].shape[0] == 2


def test_wav_round_trip(tmp_path):
    wave = torch.sin(torch.arange(1600) / 7.0) * 0.7
    save_wav(tmp_path / "x.wav", wave, 8000)
    back, rate = load_audio(tmp_path / "x.wav")
    assert rate == 8000
    torch.testing.assert_close(back, wave, atol=2 / 32768, rtol=0)  # 16-bit PCM


def test_bad_data_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\nnot json\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(tmp_path / "bad.jsonl")
    records = [
        {
            "id": "x",
            "image": "missing.png",
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "y"}],
        }
    ]
    with pytest.raises(DataFormatError, match=r"sample 'x': missing image file"):
        ConversationDataset(records, root=tmp_path)[0]
    two_markers = [
        {
            "id": "z",
            "image": "i.png",
            "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "y"}],
        }
    ]
    with pytest.raises(
        DataFormatError, match="sample 'z': 2 <image> markers in the conversation but 1 items given"
    ):
        ConversationDataset(two_markers, root=tmp_path)[0]
    (tmp_path / "i.png").write_bytes(b"not a png")
    with pytest.raises(DataFormatError, match="sample 'x': cannot read image file"):
        ConversationDataset([{**records[0], "image": "i.png"}], root=tmp_path)[0]
    with pytest.raises(DataFormatError, match="has 'audio' items, mapped to modality 'audio'"):
        ConversationDataset([{"id": 1, "audio": "a.wav", "conversations": []}]).check_modalities(["vision"])


def test_sampler_gives_each_step_one_modality_and_splits_it_across_ranks():
    rng = random.Random(0)
    groups = [rng.choice(["vision", "audio", "audio+vision"]) for _ in range(60)]
    lengths = [rng.randint(5, 50) for _ in range(60)]
    single = GroupedBatchSampler(groups, lengths, batch_size=4, seed=3)
    ranks = [
        GroupedBatchSampler(groups, lengths, batch_size=2, world_size=2, rank=r, seed=3) for r in range(2)
    ]
    for epoch in (0, 1):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        global_batches = list(single)
        assert all(len({groups[i] for i in batch}) == 1 for batch in global_batches)
        assert [a + b for a, b in zip(*ranks)] == global_batches
        used = [i for batch in global_batches for i in batch]
        assert len(used) == len(set(used))
    single.set_epoch(0)
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first  # reshuffled each epoch
    with pytest.raises(ConfigError, match="no modality group holds a full global batch of 64"):
        GroupedBatchSampler(groups, lengths, batch_size=32, world_size=2)


# -- the loop ------------------------------------------------------------------------------------------------
class TokenSamples(torch.utils.data.Dataset):
    """Pre-tokenized samples for the loop tests (no processor): half pictures, half clips."""

    def __init__(self, model, n=16, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.ids = model.config.modality_token_ids
        self.items = []
        for i in range(n):
            text = torch.randint(5, 300, (3 + i % 5,), generator=g).tolist()
            if i % 2 == 0:
                self.items.append(
                    dict(
                        ids=[1] + [self.ids["vision"]] * 4 + text,
                        pixel_values=torch.randn(IMG, generator=g),
                        key="vision",
                    )
                )
            else:
                self.items.append(
                    dict(
                        ids=[1] + [self.ids["audio"]] * 10 + text,
                        input_features=torch.randn(1, 8, 20, generator=g),
                        key="audio",
                    )
                )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def modality_key(self, i):
        return self.items[i]["key"]

    def length(self, i):
        return len(self.items[i]["ids"])

    def collate(self, items):
        width = max(len(x["ids"]) for x in items)
        ids = torch.full((len(items), width), 3)
        mask = torch.zeros_like(ids)
        for row, x in enumerate(items):
            ids[row, : len(x["ids"])] = torch.tensor(x["ids"])
            mask[row, : len(x["ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100).masked_fill(
            torch.isin(ids, torch.tensor(list(self.ids.values()))), -100
        )
        batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
        for key in ("pixel_values", "input_features"):
            if key in items[0]:
                batch[key] = torch.cat([x[key] for x in items])
        return batch


def quiet():
    return Console(record=True, width=200)


class Interrupted(Exception):
    pass


def test_loop_resumes_from_a_checkpoint_exactly(tmp_path):
    def run(output, steps=6, resume=True, grad_accum=1, stop_after=None):
        model, _ = tiny_multimodal_model()
        data = TokenSamples(model)
        batches = 0

        def collate(items):  # stop_after: the run dies while fetching that many + 1 batches
            nonlocal batches
            batches += 1
            if stop_after is not None and batches > stop_after:
                raise Interrupted
            return data.collate(items)

        config = TrainConfig(
            output_dir=str(output), stage="finetune", max_steps=steps, batch_size=2, grad_accum=grad_accum, lr=1e-3,
            warmup_ratio=0.25, save_every=2, keep_checkpoints=1, progress=False, log_every=1, resume=resume,
            save_final=False, device="cpu",
        )  # fmt: skip
        console = quiet()
        result = train(model, data, collate, config, console=console)
        return model, result, console.export_text()

    full, full_result, log = run(tmp_path / "a")
    assert [s for s, _ in full_result.losses] == [1, 2, 3, 4, 5, 6]
    assert "step 6/6  loss" in log and "checkpoint" in log
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == ["step-0000006"]  # keeps 1

    with pytest.raises(Interrupted):
        run(tmp_path / "b", stop_after=5)  # dies during step 6; the step-4 checkpoint stays
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step-0000004"]
    resumed, result, log = run(tmp_path / "b")
    assert result.resumed_from == 4 and "resumed from" in log
    assert result.losses == full_result.losses[4:]
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name

    with pytest.raises(ConfigError, match="global batch of 2, this run has 4"):
        run(tmp_path / "b", grad_accum=2)
    _, fresh, _ = run(tmp_path / "b", steps=2, resume=False)
    assert fresh.resumed_from == 0 and len(fresh.losses) == 2


def test_checkpoints_hold_what_trains_and_resuming_checks_the_frozen_weights(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    def run(steps, stage="align", perturb=None, resume=True):
        model, _ = tiny_multimodal_model()
        if perturb is not None:
            with torch.no_grad():
                dict(model.named_parameters())[perturb].add_(0.01)
        data = TokenSamples(model, n=8)
        config = TrainConfig(output_dir=str(tmp_path), stage=stage, max_steps=steps, batch_size=2, lr=1e-2,
                             save_every=2, progress=False, save_final=False, device="cpu", resume=resume)  # fmt: skip
        return model, train(model, data, data.collate, config, console=quiet())

    model, _ = run(2)
    checkpoint = tmp_path / "checkpoints" / "step-0000002"
    stored = {k.removeprefix("model.") for k in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata if k.startswith("model.")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".projector." in n for n in trainable)
    assert stored == trainable  # align: the projectors only, no frozen LLM or encoder weights
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert set(state["frozen_fingerprint"]) == {n for n, p in model.named_parameters() if not p.requires_grad}

    _, result = run(4)  # the same model: resumes, and the frozen weights are the model's own
    assert result.resumed_from == 2
    frozen = next(n for n, p in model.named_parameters() if not p.requires_grad and "language_model" in n)
    with pytest.raises(ConfigError, match=f"other frozen weights: '{re.escape(frozen)}' differs"):
        run(6, perturb=frozen)
    with pytest.raises(ConfigError, match="this run trains .* resume with the same stage"):
        run(6, stage="finetune")


def test_loop_saves_a_final_model_that_loads(tmp_path):
    model, _ = tiny_multimodal_model()
    data = TokenSamples(model, n=8)
    config = TrainConfig(output_dir=str(tmp_path), stage="align", max_steps=2, batch_size=2, lr=1e-2, progress=False,
                         activation_checkpointing=True, device="cpu")  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, data, data.collate, config, console=quiet())
    assert result.model_dir == tmp_path / "model"
    loaded = MultimodalModel.from_pretrained(result.model_dir)
    changed = {n for n, p in loaded.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".projector." in n for n in changed)  # align: only projectors moved


# -- transformers.Trainer --------------------------------------------------------------------------------------
def test_transformers_trainer_trains_with_the_collator(tmp_path, plugin_model):
    from transformers import Trainer, TrainingArguments

    model, processor = plugin_model
    dataset = ConversationDataset(write_data(tmp_path / "data", n=2))
    apply_stage(model, "finetune")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    projector = model.encoders["vision"].projector.projection[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, projector_lr=1e-2))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
        remove_unused_columns=False, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=MultimodalCollator(processor),
                      optimizers=(optimizer, None))  # fmt: skip
    output = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and output.global_step == 3
    assert not torch.equal(model.encoders["vision"].projector.projection[0].weight, projector)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# -- mmcore train -------------------------------------------------------------------------------------------------
def test_train_command_trains_resumes_and_saves(tmp_path, plugin_model):
    from typer.testing import CliRunner

    from mmcore.cli.app import build_app

    model, processor = plugin_model
    model.save_pretrained(tmp_path / "start")
    processor.save_pretrained(tmp_path / "start")
    data = write_data(tmp_path / "data", n=1)
    app = build_app()
    runner = CliRunner()
    common = ["train", str(tmp_path / "start"), "--data", str(data), "--stage", "finetune", "-o", str(tmp_path / "run"),
              "--batch-size", "2", "--lr", "1e-3", "--save-every", "2", "--log-every", "1", "--no-progress", "--device", "cpu"]  # fmt: skip
    first = runner.invoke(app, [*common, "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "step 2/2  loss" in first.output
    second = runner.invoke(app, [*common, "--steps", "3"])
    assert second.exit_code == 0, second.output
    assert "resumed from" in second.output and "step 3/3" in second.output
    saved = tmp_path / "run" / "model"
    assert (saved / "processor_config.json").is_file()
    from mmcore.processing import MultimodalProcessor

    loaded = MultimodalModel.from_pretrained(saved)
    MultimodalProcessor.from_pretrained(saved, loaded)

    bad = runner.invoke(app, [*common, "--stage", "pretrain"])
    assert bad.exit_code == 2 and "--stage 'pretrain'" in bad.output

    # From a spec of random-weight presets: --seed makes the model the same in every run, so an
    # interrupted run resumes (checkpoints hold only what trains; the frozen weights are rebuilt)
    spec = tmp_path / "model.toml"
    spec.write_text(
        '[llm]\nsource = "tiny"\n[encoders.vision]\nencoder = "clip"\npreset = "tiny"\n'
        '[encoders.audio]\nencoder = "whisper"\npreset = "tiny"\n'
    )
    from_spec = ["train", str(spec), "--data", str(data), "--stage", "align", "-o", str(tmp_path / "spec-run"),
                 "--batch-size", "2", "--save-every", "2", "--no-progress", "--device", "cpu"]  # fmt: skip
    assert runner.invoke(app, [*from_spec, "--steps", "2"]).exit_code == 0
    resumed = runner.invoke(app, [*from_spec, "--steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert "resumed from" in resumed.output
    other_seed = runner.invoke(app, [*from_spec, "--steps", "4", "--seed", "1"])
    assert other_seed.exit_code == 2 and "other frozen weights" in other_seed.output
