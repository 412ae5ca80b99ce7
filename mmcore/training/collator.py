"""`MultimodalCollator`: samples (a conversation plus per-modality items) -> one training batch.

It builds on `MultimodalProcessor`'s pieces: the conversation is rendered with the tokenizer's chat
template and tokenized once; labels keep only the assistant turns (each turn's text and whatever
the template closes it with, e.g. ``<|im_end|>``), so the prompt -- system, user turns, the
generation prompt, the placeholders -- never counts in the loss. Then the processor processes the
items of the whole batch at once (`MultimodalProcessor.process_items`), expands every placeholder
into its run (`MultimodalProcessor.expand`) and pads (`MultimodalProcessor.pad`, labels with -100).

A sample is ``{"messages": [{"role": ..., "content": ...}, ...], "vision": [img, ...],
"audio": [clip, ...]}`` (`ConversationDataset` yields these), or ``{"text": ..., <items>}`` to train
on the whole text (placeholders excepted).

``MultimodalCollator(processor, pack_to=N)`` packs the samples into rows of at most N tokens instead
of padding one row each (`mmcore.training.packing`): no ``attention_mask``, ``position_ids`` from 0 at
every sample, which transformers turns into attention within each sample; the same batch works in
mmcore's loop and under `transformers.Trainer`.

>>> collator = MultimodalCollator(processor)                              # doctest: +SKIP
>>> batch = collator([dataset[0], dataset[1]])                          # doctest: +SKIP
>>> model(**batch).loss                                                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mmcore.errors import ConfigError

IGNORE = -100


class MultimodalCollator:
    """Batch samples for a `MultimodalModel` with a `MultimodalProcessor`.

    Args:
        processor: the model's `MultimodalProcessor`.
        train_on: ``"assistant"`` (default): only assistant turns count in the loss; ``"all"``: every
            text token (placeholders and padding never count).
        padding_side: ``"right"`` for training.
        pad_to_multiple_of: pad lengths up to a multiple (tensor-core friendly on GPU).
        processor_kwargs: modality -> keyword arguments for its processor.
        pack_to: pack the samples into rows of at most this many tokens (`mmcore.training.packing`:
            first-fit decreasing into as few rows as fit, filled evenly, position ids from 0 per sample, attention within each sample, no
            ``attention_mask``); a longer sample gets a row of its own. None: one padded row each.
    """

    def __init__(
        self,
        processor: Any,
        *,
        train_on: str = "assistant",
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        processor_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        pack_to: int | None = None,
    ):
        if train_on not in ("assistant", "all"):
            raise ConfigError(f"train_on must be 'assistant' or 'all', got {train_on!r}")
        if not getattr(processor.tokenizer, "is_fast", False):
            raise ConfigError(
                "MultimodalCollator needs a fast tokenizer (it maps turns to tokens by character offsets)"
            )
        self.processor = processor
        self.train_on = train_on
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.processor_kwargs = processor_kwargs
        if pack_to is not None and pack_to < 1:
            raise ConfigError(f"pack_to must be >= 1, got {pack_to}")
        self.pack_to = pack_to
        special = set(processor.token_ids.values())
        for start, end in processor.wrap_token_ids.values():
            special |= {start, end}
        self._special = special

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ConfigError("cannot collate an empty list of samples")
        tokenized = [self.tokenize(sample, index) for index, sample in enumerate(samples)]
        modalities = self.processor.modalities
        unknown = sorted({k for s in samples for k in s} - {"messages", "text", *modalities})
        if unknown:
            raise ConfigError(
                f"sample keys {unknown} are neither messages/text nor a modality of {modalities}"
            )
        flat = {m: [item for s in samples for item in (s.get(m) or [])] for m in modalities}
        flat = {m: items for m, items in flat.items() if items}
        inputs, counts = self.processor.process_items(flat, processor_kwargs=self.processor_kwargs)
        offsets = {m: 0 for m in counts}
        all_ids, all_labels = [], []
        item_indices: list[dict[str, range]] = []  # per sample: modality -> its items' indices
        for index, (sample, (ids, labels)) in enumerate(zip(samples, tokenized)):
            sample_counts = {}
            item_indices.append({})
            for m in counts:
                n = len(sample.get(m) or [])
                sample_counts[m] = counts[m][offsets[m] : offsets[m] + n]
                item_indices[-1][m] = range(offsets[m], offsets[m] + n)
                offsets[m] += n
            expanded = self.processor.expand(ids, sample_counts, sample=index)
            # Labels expand the same way: placeholders (kept in the labels for this) grow into their
            # runs, then every placeholder or wrap token is masked.
            expanded_labels = self.processor.expand(labels, sample_counts, sample=index)
            all_ids.append(expanded)
            all_labels.append([IGNORE if t in self._special else t for t in expanded_labels])
        if self.pack_to is not None:
            return self._packed(all_ids, all_labels, inputs, item_indices)
        batch = self.processor.pad(
            all_ids,
            labels=all_labels,
            padding=True,
            padding_side=self.padding_side,
            pad_to_multiple_of=self.pad_to_multiple_of,
            return_tensors="pt",
        )
        batch.update(self.processor.model_kwargs(inputs))
        return dict(batch)

    def _packed(
        self,
        all_ids: list[list[int]],
        all_labels: list[list[int]],
        inputs: dict[str, dict[str, Any]],
        item_indices: list[dict[str, range]],
    ) -> dict[str, Any]:
        """The expanded samples packed into rows; the items follow the samples into their new order
        (the merge takes them in the order of their placeholders). The rows keep the samples in order
        where that needs fewer rows (samples that come row after row, as
        ``TokenBudgetBatchSampler(row_tokens=...)`` lists them) or where a processor's output cannot
        be reordered."""
        from mmcore.training.packing import pack, plan_rows, reorder_items

        lengths = [len(ids) for ids in all_ids]
        rows = plan_rows(lengths, self.pack_to, even=True)
        in_order = plan_rows(lengths, self.pack_to, keep_order=True)
        order = [i for row in rows for i in row]
        moved = None
        if len(rows) <= len(in_order):  # first-fit decreasing, if the items can follow their samples
            moved = reorder_items(inputs, {m: [k for i in order for k in item_indices[i][m]] for m in inputs})
        rows, inputs = (in_order, inputs) if moved is None else (rows, moved)
        samples = list(zip(all_ids, all_labels))
        pad = self.processor.tokenizer.pad_token_id
        batch = pack(samples, rows, pad_token_id=pad, pad_to_multiple_of=self.pad_to_multiple_of)
        batch.update(self.processor.model_kwargs(inputs))
        return batch

    def with_packing(self, pack_to: int | None) -> MultimodalCollator:
        """A copy of this collator that packs into rows of ``pack_to`` tokens (None: no packing)."""
        import copy

        other = copy.copy(self)
        if pack_to is not None and pack_to < 1:
            raise ConfigError(f"pack_to must be >= 1, got {pack_to}")
        other.pack_to = pack_to
        return other

    def tokenize(self, sample: Mapping[str, Any], index: int = 0) -> tuple[list[int], list[int]]:
        """One sample -> ``(ids, labels)`` with one placeholder per item; labels hold the placeholder ids
        at placeholders (for expansion) and -100 wherever the loss must not look."""
        tokenizer = self.processor.tokenizer
        text, add_special, messages = self._render(sample, index)
        if messages is not None and self.train_on == "assistant":
            spans = self._assistant_spans(messages, text, index)
        else:
            spans = [(0, len(text))]
        encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
        placeholders = set(self.processor.token_ids.values())
        ids, labels = list(encoded["input_ids"]), []
        for token, (start, end) in zip(ids, encoded["offset_mapping"]):
            if token in placeholders:
                labels.append(token)
            elif end > start and any(lo <= start and end <= hi for lo, hi in spans):
                labels.append(token)
            elif end == start and add_special and token == tokenizer.eos_token_id:
                labels.append(token)  # an EOS the tokenizer appends to a plain text
            else:
                labels.append(IGNORE)
        if not any(label != IGNORE and label not in placeholders for label in labels):
            raise ConfigError(
                f"sample {index}: no token is left to learn from (all are prompt or placeholders)"
            )
        return ids, labels

    def input_ids(self, sample: Mapping[str, Any], index: int = 0) -> list[int]:
        """The ids `tokenize` makes for ``sample`` (one placeholder per item), without its labels: one
        render of the chat template, for lengths (`ConversationDataset.use_token_lengths`)."""
        text, add_special, _ = self._render(sample, index)
        return list(self.processor.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def _render(self, sample: Mapping[str, Any], index: int) -> tuple[str, bool, list[dict[str, Any]] | None]:
        """The sample's text, whether the tokenizer adds its special tokens to it, and its flattened
        messages (None for a plain ``text`` sample)."""
        if "messages" in sample:
            messages = [self.processor.flatten_message(m, index) for m in sample["messages"]]
            return self.processor.tokenizer.apply_chat_template(messages, tokenize=False), False, messages
        if "text" in sample:
            return str(sample["text"]), True, None
        raise ConfigError(f"sample {index}: expected a 'messages' or a 'text' key, got {sorted(sample)}")

    def _assistant_spans(
        self, messages: list[dict[str, Any]], text: str, index: int
    ) -> list[tuple[int, int]]:
        """Character spans of ``text`` that assistant turns add: from the end of the prompt with the
        generation prompt to the end of the conversation including that turn."""
        tokenizer = self.processor.tokenizer
        spans = []
        for turn, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = tokenizer.apply_chat_template(
                messages[:turn], tokenize=False, add_generation_prompt=True
            )
            after = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
            if not (after.startswith(before) and text.startswith(after)):
                raise ConfigError(
                    f"sample {index}: the chat template does not render conversations as growing prefixes, so the "
                    "assistant turns cannot be told apart; use MultimodalCollator(..., train_on='all')"
                )
            spans.append((len(before), len(after)))
        if not spans:
            raise ConfigError(f"sample {index}: no assistant turn to learn from")
        return spans
