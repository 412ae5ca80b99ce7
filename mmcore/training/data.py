"""Training data: LLaVA-style JSONL conversations, media loading, and a batch sampler that groups by
modality and length.

One JSONL line is one sample::

    {"id": "0001", "image": "images/0001.png", "audio": "clips/0001.wav",
     "conversations": [{"from": "human", "value": "<image>\\nWhat shape is this?"},
                       {"from": "gpt", "value": "a red circle"}]}

``image``, ``audio`` and ``video`` are paths relative to the JSONL file (or absolute), or lists of
paths for several items (a video is a ``.npy`` ``(frames, H, W, 3)`` uint8 array or a directory of
frame images, for the modality named ``video``: an image tower built with ``video=True``);
``<image>``/``<audio>``/``<video>`` in the text mark where each item goes (a sample without a
marker gets its items at the start of the first human turn, as LLaVA does). Roles ``human``/``user``
and ``gpt``/``assistant`` are accepted; ``system`` too.
"""

from __future__ import annotations

import json
import random
import wave
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mmcore.errors import ConfigError, DataFormatError  # noqa: F401 (DataFormatError: re-exported)
from mmcore.modeling.tokens import placeholder_token

#: JSONL key (and its ``<key>`` text marker) -> default model modality (encoder name).
DEFAULT_MEDIA_KEYS = {"image": "vision", "audio": "audio"}

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; `DataFormatError` names the line of a malformed one."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"training data {str(path)!r} is not a file")
    records = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                raise DataFormatError(f"{path}:{number}: expected an object with a 'conversations' list")
            records.append(record)
    if not records:
        raise DataFormatError(f"training data {str(path)!r} holds no records")
    return records


def load_image(path: str | Path) -> Any:
    """An RGB PIL image. 16- and 32-bit greyscale images (PNG modes ``I;16``, ``I``) are scaled to
    8 bit by their bit depth; ``convert("RGB")`` alone would clip them to white."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16") or image.mode == "I":
                image.load()
                import numpy as np

                bits = 16 if image.mode.startswith("I;16") or image.info.get("bits", 16) <= 16 else 32
                values = np.asarray(image, dtype=np.float64)
                grey = np.clip(np.round(values * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)
                return Image.fromarray(grey, mode="L").convert("RGB")
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise DataFormatError(
            f"{path}: image too large to decode safely ({exc}); downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS "
            "if you trust the file"
        ) from exc


def load_audio(path: str | Path) -> tuple[torch.Tensor, int]:
    """``(mono waveform float32 in [-1, 1], sampling rate)``. PCM WAV files are read with the standard
    library; other formats go through ``torchaudio.load`` (which needs torchcodec)."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        with wave.open(str(path), "rb") as fh:
            width, channels, rate = fh.getsampwidth(), fh.getnchannels(), fh.getframerate()
            frames = fh.readframes(fh.getnframes())
        dtypes = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
        if width not in dtypes:
            raise DataFormatError(f"{path}: {8 * width}-bit WAV is not supported (8, 16 or 32-bit PCM)")
        samples = torch.frombuffer(bytearray(frames), dtype=dtypes[width]).float()
        samples = (samples - 128) / 128 if width == 1 else samples / float(2 ** (8 * width - 1))
        return samples.view(-1, channels).mean(dim=1), rate
    try:
        import torchaudio

        waveform, rate = torchaudio.load(str(path))
    except (ImportError, RuntimeError) as exc:
        raise DataFormatError(
            f"{path}: no decoder for {path.suffix or 'this'} audio ({type(exc).__name__}: {exc}); "
            "install torchcodec (pip install torchcodec) or convert the file to PCM WAV"
        ) from exc
    return waveform.mean(dim=0), rate


def save_wav(path: str | Path, waveform: torch.Tensor, sampling_rate: int) -> None:
    """Write a mono float waveform in [-1, 1] as 16-bit PCM WAV (standard library)."""
    pcm = (waveform.clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(int(sampling_rate))
        fh.writeframes(pcm.numpy().tobytes())


def load_video(path: str | Path) -> Any:
    """One video: a ``.npy`` ``(frames, H, W, 3)`` uint8 array, or a directory of frame images (a tuple
    of PIL images, in name order); see `mmcore.builtin.video.load_video`. No video decoder: decode
    ``.mp4`` files into either form first (decord, torchvision.io or PyAV)."""
    from mmcore.builtin.video import load_video as load

    return load(path)


#: JSONL media key -> loader of one file: mmcore's own; installed encoder plugins add theirs
#: (`registered_loaders`).
LOADERS = {"image": load_image, "audio": load_audio, "video": load_video}


def registered_loaders() -> dict[str, Any]:
    """Data key -> loader of one file: `LOADERS` plus every installed encoder plugin's
    (`mmcore.factory.EncoderFactory.data_key` and ``load_item``), so a third party's modality (an
    IMU clip, a point cloud) trains from JSONL like images and audio do."""
    from mmcore.errors import MMCoreError
    from mmcore.factory import EncoderFactory, get_factory
    from mmcore.plugins import get_registry

    loaders = dict(LOADERS)
    for spec in get_registry().list_encoders():
        try:
            factory = get_factory(spec.qualified_name)
        except MMCoreError:  # a plugin that cannot load is reported by `mmcore plugins`
            continue
        key = getattr(factory, "data_key", None)
        if key and key not in loaders and type(factory).load_item is not EncoderFactory.load_item:
            loaders[key] = factory.load_item
    return loaders


def default_media_keys(loaders: Mapping[str, Any]) -> dict[str, str]:
    """``image -> vision``, ``audio -> audio``, and each plugin data key to the modality of its name."""
    return {**{k: k for k in loaders}, **DEFAULT_MEDIA_KEYS}


def media_keys_for(model: Any, loaders: Mapping[str, Any]) -> dict[str, str]:
    """JSONL key -> modality for ``model``: `default_media_keys`, except that a key which exactly one
    of the model's plugin-built encoders reads (its factory's ``data_key_for`` its recipe, e.g.
    ``"image"`` for a Qwen2-VL tower, ``"video"`` for the same tower or a CLIP one with ``video=True``)
    goes to that encoder, whatever its name."""
    from mmcore.errors import MMCoreError
    from mmcore.factory import PLUGIN_SOURCE, factory_for_source

    keys = default_media_keys(loaders)
    readers: dict[str, list[str]] = {}
    for name, encoder in getattr(model, "encoders", {}).items():
        source = getattr(encoder, "source", None) or {}
        if source.get("kind") != PLUGIN_SOURCE:
            continue
        try:
            key = factory_for_source(name, source).data_key_for(source.get("recipe") or {})
        except MMCoreError:
            continue
        if key in loaders:
            readers.setdefault(key, []).append(name)
    keys.update({key: names[0] for key, names in readers.items() if len(names) == 1})
    return keys


def to_messages(
    conversations: Sequence[Mapping[str, Any]], markers: Mapping[str, str], counts: Mapping[str, int]
) -> list[dict[str, str]]:
    """LLaVA turns -> chat ``messages``, each ``<key>`` marker replaced by its modality's placeholder;
    items without markers go to the start of the first user turn."""
    messages = []
    if not isinstance(conversations, list):
        raise DataFormatError(f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    for number, turn in enumerate(conversations):
        if not isinstance(turn, Mapping):
            raise DataFormatError(
                f"conversation turn {number} must be an object like {{\"from\": \"human\", \"value\": \"...\"}}, "
                f"got {type(turn).__name__} {turn!r:.60}"
            )
        value = turn.get("value", turn.get("content", ""))
        if not isinstance(value, str):
            raise DataFormatError(f"conversation turn {number}: 'value' must be a string, got {type(value).__name__}")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise DataFormatError(
                f"unknown conversation role in {dict(turn)!r}; expected human/gpt (or user/assistant, system)"
            )
        text = str(turn.get("value", turn.get("content", "")))
        for marker, placeholder in markers.items():
            text = text.replace(marker, placeholder)
        messages.append({"role": role, "content": text})
    for marker, placeholder in markers.items():
        found = sum(m["content"].count(placeholder) for m in messages)
        wanted = counts.get(marker, 0)
        if found == 0 and wanted:
            first = next((m for m in messages if m["role"] == "user"), None)
            if first is None:
                raise DataFormatError("a sample with media needs a human turn to put them in")
            first["content"] = "\n".join([placeholder] * wanted + [first["content"]])
        elif found != wanted:
            raise DataFormatError(f"{found} {marker} markers in the conversation but {wanted} items given")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError("a training conversation needs at least one gpt/assistant turn")
    return messages


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA-style records -> samples for `MultimodalCollator`:
    ``{"messages": [...], "<modality>": [items...]}`` (images as RGB PIL images, audio as
    ``(waveform, sampling_rate)`` pairs, which audio processors such as Whisper's resample).

    Args:
        records: dicts as in the module docstring (see `read_jsonl`), or a JSONL path.
        root: directory relative media paths start from (default: the JSONL file's directory).
        media_keys: JSONL key -> model modality (encoder name); default ``image -> vision``,
            ``audio -> audio`` (and each loader's key to the modality of the same name).
        loaders: JSONL key -> ``fn(path) -> item``; default `LOADERS` (`registered_loaders` adds the
            installed plugins').
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]] | str | Path,
        root: str | Path | None = None,
        media_keys: Mapping[str, str] | None = None,
        loaders: Mapping[str, Any] | None = None,
    ):
        if isinstance(records, (str, Path)):
            root = Path(records).parent if root is None else root
            records = read_jsonl(records)
        self.records = list(records)
        self.root = Path(root) if root is not None else Path.cwd()
        self.loaders = dict(loaders or LOADERS)
        self.media_keys = dict(media_keys or default_media_keys(self.loaders))
        unknown = sorted(set(self.media_keys) - set(self.loaders))
        if unknown:
            raise DataFormatError(f"media keys {unknown} unknown; supported: {', '.join(self.loaders)}")
        self._token_lengths: list[int] | None = None

    def __len__(self) -> int:
        return len(self.records)

    def _paths(self, record: Mapping[str, Any], key: str) -> list[Path]:
        value = record.get(key)
        if value is None:
            return []
        values = value if isinstance(value, list) else [value]
        bad = next((v for v in values if not isinstance(v, str) or not v), None)
        if bad is not None or not values:
            raise DataFormatError(
                f"{key!r} must be a file path or a list of file paths, got {json.dumps(value)[:60]}"
            )
        return [p if p.is_absolute() else self.root / p for p in map(Path, values)]

    def _messages(self, index: int) -> tuple[list[dict[str, str]], dict[str, list[Path]]]:
        """The sample's chat messages (one placeholder per item) and its media paths by key."""
        record = self.records[index]
        markers = {f"<{key}>": placeholder_token(modality) for key, modality in self.media_keys.items()}
        try:
            paths = {key: self._paths(record, key) for key in self.media_keys}
            messages = to_messages(
                record["conversations"], markers, {f"<{k}>": len(v) for k, v in paths.items()}
            )
        except DataFormatError as exc:
            raise DataFormatError(f"sample {record.get('id', index)!r}: {exc}") from exc
        return messages, paths

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        name = record.get("id", index)
        messages, paths = self._messages(index)
        sample: dict[str, Any] = {"messages": messages}
        for key, modality in self.media_keys.items():
            missing = [str(p) for p in paths[key] if not p.exists()]  # a video may be a directory of frames
            if missing:
                raise DataFormatError(f"sample {name!r}: missing {key} file(s) {missing}")
            items = []
            for path in paths[key]:
                try:
                    items.append(self.loaders[key](path))
                except DataFormatError as exc:
                    raise DataFormatError(f"sample {name!r}: {exc}") from exc
                except (OSError, ValueError, EOFError, wave.Error) as exc:
                    raise DataFormatError(
                        f"sample {name!r}: cannot read {key} file {str(path)!r} ({exc})"
                    ) from exc
            if items:
                sample[modality] = items
        return sample

    def check_modalities(self, modalities: Sequence[str]) -> None:
        """`DataFormatError` when a record has items for a modality not in ``modalities`` (the model's)."""
        for key, modality in self.media_keys.items():
            if modality in modalities:
                continue
            used = next((r.get("id", i) for i, r in enumerate(self.records) if r.get(key)), None)
            if used is not None:
                raise DataFormatError(
                    f"sample {used!r} has {key!r} items, mapped to modality {modality!r}, but the model's encoders "
                    f"are {list(modalities)}; map the key to one of them (media_keys / --media {key}=NAME)"
                )

    def use_token_lengths(self, collator: Any) -> dict[str, int]:
        """From now on `length` is each sample's tokens as ``collator`` (a `MultimodalCollator`) makes
        them, estimated without opening the sample's media: its text exactly as the collator tokenizes
        it (chat template included), and each item as many tokens as the items of the first sample of
        its modality in the data set, measured once through the processor (exact for fixed-size
        encoders; for items whose count follows their size, anyres tiles or audio clips, a typical
        value). Token budgets (`TokenBudgetBatchSampler`, ``mmcore train --batch-length``) then count
        tokens. Returns the measured tokens per item, by modality."""
        processor = collator.processor
        per_item: dict[str, int] = {}
        for modality in sorted(set(self.media_keys.values())):
            key = next(k for k, m in self.media_keys.items() if m == modality)
            first = next((i for i, r in enumerate(self.records) if r.get(key)), None)
            if first is None or modality not in processor.modalities:
                continue
            items = self[first][modality]
            _, counts = processor.process_items({modality: items})
            per_item[modality] = max(1, round(sum(counts[modality]) / len(counts[modality])))
        lengths = []
        for index in range(len(self)):
            messages, paths = self._messages(index)
            ids = collator.input_ids({"messages": messages}, index)
            counts: dict[str, list[int]] = {}
            for key, modality in self.media_keys.items():
                if paths[key]:  # a modality the sample has no items of is not the processor's business
                    counts.setdefault(modality, []).extend([per_item.get(modality, 1)] * len(paths[key]))
            lengths.append(len(processor.expand(ids, counts, sample=index)))
        self._token_lengths = lengths
        return per_item

    def modality_key(self, index: int) -> str:
        """The sample's set of modalities, as a group key (``"audio+vision"``, ``"text"``)."""
        record = self.records[index]
        present = sorted(m for k, m in self.media_keys.items() if record.get(k))
        return "+".join(present) or "text"

    def length(self, index: int) -> int:
        """A cheap length estimate for grouping and token budgets: the sample's tokens once
        `use_token_lengths` has run, else characters of the conversation (media unopened)."""
        if self._token_lengths is not None:
            return self._token_lengths[index]
        turns = self.records[index].get("conversations")
        return sum(
            len(str(t.get("value", t.get("content", ""))))
            for t in (turns if isinstance(turns, list) else [])
            if isinstance(t, Mapping)
        )


def check_data(
    path: str | Path, media_keys: Mapping[str, str] | None = None, loaders: Mapping[str, Any] | None = None
) -> list[str]:
    """Every problem of a JSONL training file, one ``file:line: what`` string each (empty: clean).

    Each line must parse, be an object with a ``conversations`` list of turns with string values,
    name media as paths that exist and decode, and have as many ``<key>`` markers as items: what
    `ConversationDataset` would otherwise meet mid-run, found before the first step.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path}: training data is not a file"]
    problems, records = [], 0
    with path.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: not valid JSON ({exc.msg})")
                continue
            records += 1
            if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
                problems.append(f"{where}: expected an object with a 'conversations' list")
                continue
            try:
                ConversationDataset([record], root=path.parent, media_keys=media_keys, loaders=loaders)[0]
            except DataFormatError as exc:
                problems.append(f"{where}: {exc}")
    if not records and not problems:
        problems.append(f"{path}: holds no records")
    return problems


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """The base of mmcore's batch samplers (`GroupedBatchSampler`, `TokenBudgetBatchSampler`): each
    step is a global batch of one group (``self.groups[i]``: sample ``i``'s), split across
    ``world_size`` ranks, and the steps depend only on ``self.seed`` and the epoch (`set_epoch`).
    Subclasses implement ``_global_batches(epoch)`` (the epoch's steps) and ``__iter__`` (this rank's
    share of each), starting the former with `_epoch_start`."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._global_batches(self.epoch))

    def _global_batches(self, epoch: int) -> list[Any]:
        raise NotImplementedError

    def _setup(self, groups: Sequence[str], world_size: int, rank: int, seed: int, *, empty: str) -> None:
        """Keep the groups and the split; ``empty``: the error when epoch 0 holds no step."""
        self.groups = list(groups)
        self.world_size, self.rank, self.seed = world_size, rank, seed
        if not self._global_batches(0):
            raise ConfigError(empty)

    def _epoch_start(self, epoch: int) -> tuple[random.Random, dict[str, list[int]]]:
        """The epoch's random generator (seeded by ``seed`` and ``epoch`` alone) and each group's sample
        indices, in sample order."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        by_group: dict[str, list[int]] = {}
        for index, group in enumerate(self.groups):
            by_group.setdefault(group, []).append(index)
        return rng, by_group


class GroupedBatchSampler(StepBatchSampler):
    """Batches of one modality group each, of similar lengths, split evenly across ranks.

    Each step takes a *global* batch (``batch_size * world_size`` samples of one group), and rank
    ``r`` gets its ``r``-th slice. The global batches depend only on ``seed``, ``epoch`` and the global
    batch size, so N ranks see, together, exactly what one process with an N-times larger batch
    sees -- and all ranks run the same encoders at each step (no stand-in items are needed, see
    `MultimodalModel._agree_on_modalities`).

    Lengths are grouped LLaVA-style: shuffle, cut into mega-batches of ``mega_batches`` global
    batches, sort each by length, cut into global batches, shuffle the batch order. Incomplete
    global batches are dropped (a group smaller than one global batch yields nothing).
    """

    def __init__(
        self,
        groups: Sequence[str],
        lengths: Sequence[int] | None,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        group_by_modality: bool = True,
        mega_batches: int = 8,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.lengths = list(lengths) if lengths is not None else None
        self.batch_size, self.mega_batches = batch_size, mega_batches
        self._setup(
            groups if group_by_modality else ["all"] * len(groups), world_size, rank, seed,
            empty=f"no modality group holds a full global batch of {batch_size * world_size} samples "
            f"(batch size {batch_size} x {world_size} processes); lower the batch size",
        )  # fmt: skip

    def _global_batches(self, epoch: int) -> list[list[int]]:
        rng, by_group = self._epoch_start(epoch)
        size = self.batch_size * self.world_size
        batches: list[list[int]] = []
        for group in sorted(by_group):
            indices = by_group[group]
            rng.shuffle(indices)
            if self.lengths is not None:
                mega = size * self.mega_batches
                indices = [
                    i
                    for start in range(0, len(indices), mega)
                    for i in sorted(
                        indices[start : start + mega], key=lambda i: self.lengths[i], reverse=True
                    )
                ]
            batches += [indices[s : s + size] for s in range(0, len(indices) - size + 1, size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches(self.epoch):
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    @classmethod
    def for_dataset(cls, dataset: Any, batch_size: int, **kwargs: Any) -> GroupedBatchSampler:
        """From a dataset with ``modality_key(i)`` / ``length(i)`` (as `ConversationDataset`); one
        group and no length grouping for a dataset without them."""
        n = len(dataset)
        groups = (
            [dataset.modality_key(i) for i in range(n)] if hasattr(dataset, "modality_key") else ["all"] * n
        )
        lengths = [dataset.length(i) for i in range(n)] if hasattr(dataset, "length") else None
        return cls(groups, lengths, batch_size, **kwargs)
