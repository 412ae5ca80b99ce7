"""`MultimodalProcessor`: the LLM's tokenizer plus one processor per modality, and placeholder expansion.

The text carries one placeholder token per item (``<vision>``, ``<audio>``: one special token per
modality, never split by the tokenizer). The processor turns each modality's raw items into the
encoder's inputs, asks how many tokens each item becomes (the plugin's ``num_tokens``, or the user's
function, then the projector's `~mmcore.MultimodalProjector.num_output_tokens`, as the projector
declares it: a resampler gives ``num_queries``), and expands each placeholder into that many, in
order, optionally wrapped in ``<vision_start>``/``<vision_end>``. The result goes straight into ``model(**batch)`` or
``model.generate(**batch)``.

>>> processor = MultimodalProcessor.from_model(model, tokenizer)                  # doctest: +SKIP
>>> batch = processor(["<vision><vision> compare them", "<audio> what is it?"],
...                   vision=[[img1, img2], []], audio=[[], [clip]])              # doctest: +SKIP
>>> model(**batch, labels=batch["input_ids"]).loss                                # doctest: +SKIP
>>> model.generate(**processor(messages=chat, vision=[img], add_generation_prompt=True,
...                            padding_side="left"), max_new_tokens=32)           # doctest: +SKIP

Items per modality are given as a keyword named after the modality: one list per sample
(``vision=[[img1, img2], [img3]]``), or one flat list consumed in text order across the batch
(``vision=[img1, img2, img3]``); anything but a list is one item. A per-sample list is recognised as
a list holding one list per sample, so give a raw item as an array, a tensor or a tuple (such as
``(waveform, sampling_rate)``), never as a Python list.

Counting functions (``num_tokens=``, as a plugin factory's ``num_tokens`` counts; Cornstarch's name
``num_feature_calculation_funcs=`` is accepted too) are for encoders a plugin did not build. Signature, as in Cornstarch: ``fn(items, processed) -> list[int]`` where ``items`` is
the list of raw items given to the modality's processor and ``processed`` the dict it returned; the
result has one count per item (a list of per-sample lists is flattened): the number of features the
*encoder* (with its callbacks) yields per item. The projector's effect is applied on top.

Building blocks for a training collator (all used by ``__call__``):

- ``processor(..., padding=False, return_tensors=None)``: ``input_ids`` and ``attention_mask`` as one
  unpadded list per sample (placeholders expanded), the encoder inputs as tensors.
- `MultimodalProcessor.process_items`: items per modality -> encoder inputs and tokens per item.
- `MultimodalProcessor.expand`: one sample's ids with one placeholder per item -> expanded ids.
- `MultimodalProcessor.pad`: lists of ids (and labels, padded with -100) -> padded tensors.

Saving: ``processor.save_pretrained(dir)`` writes the tokenizer and ``processor_config.json`` (and an
HF processor the user gave into a subfolder). Model and processor share one directory in either
order: a model save replaces only the model's files (config, weights) and keeps the processor's, and
a processor save keeps the model's. ``MultimodalProcessor.from_pretrained(dir)`` then rebuilds each plugin
processor from the recipes in the directory's ``config.json``, without the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature

from mmcore.errors import (
    ConfigError,
    EncoderInputError,
    PlaceholderMismatchError,
    SerializationError,
    TokenIdError,
)
from mmcore.files import staged_directory
from mmcore.modeling.encoder import RESERVED_INPUT_NAMES
from mmcore.modeling.merge import expand_placeholders
from mmcore.modeling.tokens import add_modality_tokens, placeholder_token, wrap_tokens

PROCESSOR_CONFIG = "processor_config.json"
FORMAT_VERSION = 1
PLUGIN = "plugin"

NumTokensFn = Callable[[Sequence[Any], Mapping[str, Any]], Sequence[int]]


@dataclass(frozen=True)
class _EncoderInfo:
    """What the processor needs to know about one encoder of the model (from the model or config.json)."""

    source: Mapping[str, Any] | None  # a plugin's {"kind": "plugin", "encoder": ..., "recipe": ...}
    input_names: tuple[str, ...] | None  # call arguments the encoder takes
    output_tokens: Callable[[int], int] | None  # the projector's num_output_tokens

    @property
    def from_plugin(self) -> bool:
        return bool(self.source) and self.source.get("kind") == PLUGIN


class MultimodalBatch(BatchFeature):
    """A `BatchFeature` whose ``to()`` also moves the nested ``encoder_inputs`` (present only when two
    modalities' inputs share a name, or one uses a name the text owns)."""

    def to(self, *args: Any, **kwargs: Any) -> MultimodalBatch:
        nested = self.data.pop("encoder_inputs", None)
        super().to(*args, **kwargs)
        if nested is not None:
            self.data["encoder_inputs"] = {
                m: BatchFeature(dict(v)).to(*args, **kwargs).data for m, v in nested.items()
            }
        return self


def _counting_functions(
    num_tokens: Mapping[str, NumTokensFn] | None, num_feature_calculation_funcs: Mapping[str, NumTokensFn] | None
) -> dict[str, NumTokensFn]:
    """The one mapping of counting functions given, under mmcore's name or Cornstarch's."""
    if num_tokens is not None and num_feature_calculation_funcs is not None:
        raise ConfigError("pass num_tokens or num_feature_calculation_funcs (Cornstarch's name for it), not both")
    return dict(num_tokens if num_tokens is not None else num_feature_calculation_funcs or {})


class MultimodalProcessor:
    """Tokenizer + per-modality processors for a `MultimodalModel`.

    Args:
        encoder_processors: modality -> callable ``processor(items) -> dict[str, Tensor]`` (first
            dimension: one row per item), e.g. a plugin's processor or an HF image processor /
            feature extractor (called with ``return_tensors="pt"``).
        llm_tokenizer: the language model's tokenizer.
        model: the `MultimodalModel`. Its encoders say how many tokens an item becomes (plugin
            encoders count themselves; projectors may change the count), and the placeholder (and
            wrap) tokens are added to tokenizer and model (`add_modality_tokens`) unless both already
            agree on them. Without a model the tokenizer must already have the tokens.
        num_feature_calculation_funcs: modality -> ``fn(items, processed) -> list[int]`` (see the
            module docstring); required for modalities whose encoder a plugin did not build.
            Cornstarch's name; ``num_tokens=`` (keyword) is mmcore's, for the same mapping.
        predefined_tokens: modality -> the placeholder string the text uses for it (Cornstarch's
            name), e.g. ``{"vision": "<image>"}`` when a data set already writes ``<image>``; default
            ``<modality>``. Added to the tokenizer as a special token (one that is already there keeps
            its id); a chat message part ``{"type": "image"}`` then means ``<image>``.
        wrap: put ``<m_start>``/``<m_end>`` around each item's run. ``None``: wrap when the model
            has wrap token ids for every modality.
        padding_side: ``"left"`` (generation) or ``"right"``; ``None``: the tokenizer's.

    Example:
        >>> processor = MultimodalProcessor(
        ...     encoder_processors={"vision": CLIPImageProcessor(), "audio": WhisperFeatureExtractor()},
        ...     llm_tokenizer=tokenizer,
        ...     model=mllm,
        ...     num_feature_calculation_funcs={"vision": lambda items, out: [256] * len(items),
        ...                                    "audio": lambda items, out: [1500] * len(items)},
        ... )                                                                         # doctest: +SKIP
    """

    def __init__(
        self,
        encoder_processors: Mapping[str, Callable[..., Mapping[str, Any]]],
        llm_tokenizer: Any,
        model: Any = None,
        num_feature_calculation_funcs: Mapping[str, NumTokensFn] | None = None,
        predefined_tokens: Mapping[str, str] | None = None,
        *,
        wrap: bool | None = None,
        padding_side: str | None = None,
        num_tokens: Mapping[str, NumTokensFn] | None = None,
        _encoder_info: Mapping[str, _EncoderInfo] | None = None,
    ):
        if not encoder_processors:
            raise ConfigError(
                "MultimodalProcessor needs at least one encoder processor (modality -> processor)"
            )
        if padding_side not in (None, "left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.encoder_processors: dict[str, Callable[..., Mapping[str, Any]]] = dict(encoder_processors)
        self.tokenizer = llm_tokenizer
        self.padding_side = padding_side
        modalities = list(self.encoder_processors)
        funcs = _counting_functions(num_tokens, num_feature_calculation_funcs)
        unknown = sorted(set(funcs) - set(modalities))
        if unknown:
            raise ConfigError(f"num_tokens for {unknown}, but the processors are for {sorted(modalities)}")
        if model is not None:
            missing = sorted(set(modalities) - set(model.encoders))
            if missing:
                raise ConfigError(
                    f"processors given for {missing}, but the model's encoders are {sorted(model.encoders)}"
                )
            _encoder_info = {m: _info_from_module(model.encoders[m]) for m in modalities}
        self._encoders: dict[str, _EncoderInfo] = dict(_encoder_info or {})
        self._counters: dict[str, NumTokensFn] = {}
        self._count_from_plugin: set[str] = set()
        for m in modalities:
            info = self._encoders.get(m)
            if m in funcs:
                self._counters[m] = funcs[m]
            elif info is not None and info.from_plugin:
                self._counters[m] = _PluginCounter(m, info.source)
                self._count_from_plugin.add(m)
            elif model is not None and (default := _default_counter(model.encoders[m], self.encoder_processors[m])):
                self._counters[m] = default
            else:
                how = "no model says how" if info is None else "a plugin did not build its encoder"
                raise ConfigError(
                    f"cannot tell how many tokens a {m!r} item becomes ({how}); pass "
                    f"num_tokens={{{m!r}: fn}} (Cornstarch: num_feature_calculation_funcs) with "
                    "fn(items, processed) -> list[int]"
                )
        # Which processors came from the model's plugin recipes (from_model/from_pretrained set it):
        # those are saved as "from the recipe", not as files.
        self._processor_from_plugin: set[str] = set()
        self._setup_tokens(model, modalities, wrap, predefined_tokens)

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        *,
        encoder_processors: Mapping[str, Callable[..., Mapping[str, Any]]] | None = None,
        num_feature_calculation_funcs: Mapping[str, NumTokensFn] | None = None,
        predefined_tokens: Mapping[str, str] | None = None,
        wrap: bool | None = None,
        padding_side: str | None = None,
        num_tokens: Mapping[str, NumTokensFn] | None = None,
    ) -> MultimodalProcessor:
        """A processor for every encoder of ``model``: processors and token counts from the plugin
        that built each encoder. ``encoder_processors`` / ``num_tokens`` (or Cornstarch's
        ``num_feature_calculation_funcs``) override them, and are required for an encoder no plugin
        built (the error names it)."""
        given = dict(encoder_processors or {})
        unknown = sorted(set(given) - set(model.encoders))
        if unknown:
            raise ConfigError(
                f"encoder_processors for {unknown}, but the model's encoders are {sorted(model.encoders)}"
            )
        processors: dict[str, Any] = {}
        from_plugin = set()
        for name, encoder in model.encoders.items():
            if name in given:
                processors[name] = given[name]
                continue
            info = _info_from_module(encoder)
            if not info.from_plugin:
                kind = (encoder.source or {}).get("kind", type(encoder.module).__name__)
                raise ConfigError(
                    f"encoder {name!r} was not built by a plugin ({kind}), so mmcore has no processor for it; "
                    f"pass encoder_processors={{{name!r}: processor}} and num_tokens={{{name!r}: fn}}"
                )
            processors[name] = _plugin_processor(name, info.source)
            from_plugin.add(name)
        processor = cls(
            processors,
            tokenizer,
            model,
            predefined_tokens=predefined_tokens,
            wrap=wrap,
            padding_side=padding_side,
            num_tokens=_counting_functions(num_tokens, num_feature_calculation_funcs),
        )
        processor._processor_from_plugin = from_plugin
        return processor

    def _setup_tokens(
        self, model: Any, modalities: list[str], wrap: bool | None, predefined: Mapping[str, str] | None
    ) -> None:
        predefined = dict(predefined or {})
        unknown = sorted(set(predefined) - set(modalities))
        if unknown:
            raise ConfigError(f"predefined_tokens for {unknown}, but the processors are for {sorted(modalities)}")
        bad = {m: t for m, t in predefined.items() if not isinstance(t, str) or not t.strip()}
        if bad:
            raise ConfigError(f"predefined_tokens must map a modality to a non-empty string, got {bad}")
        tokens = {m: predefined.get(m) or placeholder_token(m) for m in modalities}
        if len(set(tokens.values())) != len(tokens):
            raise ConfigError(f"each modality needs its own placeholder token, got {tokens}")
        if model is not None and wrap is None:
            saved = model.config.modality_wrap_token_ids
            wrap = all(m in saved for m in modalities)
        wrap = bool(wrap)
        wraps = {m: wrap_tokens(m) for m in modalities} if wrap else {}
        needed = [*tokens.values(), *(t for pair in wraps.values() for t in pair)]
        vocab = self.tokenizer.get_vocab()
        if model is not None:
            agree = (
                all(t in vocab for t in needed)
                and all(model.config.modality_token_ids.get(m) == vocab[t] for m, t in tokens.items())
                and all(
                    list(model.config.modality_wrap_token_ids.get(m, ())) == [vocab[s], vocab[e]]
                    for m, (s, e) in wraps.items()
                )
            )
            if not agree:
                add_modality_tokens(self.tokenizer, model, modalities, wrap=wrap, tokens=tokens)
                vocab = self.tokenizer.get_vocab()
            rows = model.get_input_embeddings().weight.shape[0]
            outside = [t for pair in wraps.values() for t in pair if vocab[t] >= rows]
            if outside:
                raise TokenIdError(
                    f"wrap tokens {outside} have ids outside the language model's {rows} embedding rows; "
                    "resize the embeddings (model.resize_token_embeddings(len(tokenizer)))"
                )
        else:
            missing = [t for t in needed if t not in vocab]
            if missing:
                raise TokenIdError(
                    f"the tokenizer has no {', '.join(missing)} token(s); pass model= so they are added to the "
                    "tokenizer and the model together, or use the tokenizer saved with the model"
                )
        self.tokens: dict[str, str] = tokens
        self.token_ids: dict[str, int] = {m: int(vocab[t]) for m, t in tokens.items()}
        self.wrap_token_ids: dict[str, tuple[int, int]] = {
            m: (int(vocab[s]), int(vocab[e])) for m, (s, e) in wraps.items()
        }
        self.wrap = wrap

    # -- properties and tokenizer pass-throughs ---------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.encoder_processors)

    @property
    def llm_tokenizer(self) -> Any:
        """The language model's tokenizer (Cornstarch's name for `tokenizer`)."""
        return self.tokenizer

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{m}: {type(p).__name__}" for m, p in self.encoder_processors.items())
        return f"{type(self).__name__}({parts}; tokenizer={type(self.tokenizer).__name__}, wrap={self.wrap})"

    # -- the call ---------------------------------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        *,
        messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool = False,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        processor_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        **items: Any,
    ) -> MultimodalBatch:
        """Tokenize ``text`` (or render ``messages`` with the tokenizer's chat template), process each
        modality's items, expand the placeholders, pad.

        Args:
            text: a string or a list of strings (the batch) with placeholders such as ``<vision>``.
            messages: a conversation (list of ``{"role", "content"}``) or a list of them; ``content``
                is a string with placeholders or a list of parts ``{"type": "text", "text": ...}`` /
                ``{"type": "<modality>"}``.
            return_tensors: ``"pt"``, or ``None`` for lists (encoder inputs stay tensors).
            padding: ``True``/``"longest"``, ``"max_length"`` (with ``max_length``) or ``False``.
            padding_side: ``"left"`` for generation; default: the processor's, else the tokenizer's.
            add_special_tokens: default ``True`` for ``text``, ``False`` for ``messages`` (the chat
                template writes them).
            add_generation_prompt / chat_template_kwargs: passed to ``apply_chat_template``.
            processor_kwargs: modality -> extra keyword arguments for its processor, e.g.
                ``{"audio": {"sampling_rate": 16000}}``.
            (No truncation: cutting into a run of placeholders would break the merge.)
            **items: modality -> items, per sample (``vision=[[a, b], [c]]``) or flat in text order.

        Returns:
            ``input_ids``, ``attention_mask`` and every encoder input (``pixel_values`` of shape
            ``(items, 3, H, W)`` over the whole batch, in order, ...). When two modalities' inputs share
            a name, they go under ``encoder_inputs={modality: {...}}``, which the model also accepts.

        Raises:
            PlaceholderMismatchError: a sample has more or fewer placeholders than items (names the
                sample, the modality and both counts).
            EncoderInputError: an item keyword names no modality of this processor.
        """
        texts, from_messages = self._texts(text, messages, add_generation_prompt, chat_template_kwargs)
        if add_special_tokens is None:
            add_special_tokens = not from_messages
        ids = [list(s) for s in self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
        per_sample = self._split_items(ids, items)
        flat = {m: [item for sample in samples for item in sample] for m, samples in per_sample.items()}
        encoder_inputs, counts = self.process_items(flat, processor_kwargs=processor_kwargs)
        expanded = []
        offsets = {m: 0 for m in per_sample}
        for i, sample_ids in enumerate(ids):
            sample_counts = {}
            for m, samples in per_sample.items():
                n = len(samples[i])
                sample_counts[m] = counts[m][offsets[m] : offsets[m] + n]
                offsets[m] += n
            expanded.append(self.expand(sample_ids, sample_counts, sample=i))
        data = self.pad(
            expanded,
            padding=padding,
            padding_side=padding_side,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors=return_tensors,
        )
        data.update(self.model_kwargs(encoder_inputs))
        return MultimodalBatch(data)

    def _texts(
        self,
        text: str | Sequence[str] | None,
        messages: Any,
        add_generation_prompt: bool,
        chat_template_kwargs: Mapping[str, Any] | None,
    ) -> tuple[list[str], bool]:
        if (text is None) == (messages is None):
            raise ConfigError("pass either text= or messages= (exactly one)")
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
            if not texts or bad:
                raise ConfigError(
                    f"text must be a string or a non-empty list of strings, got {bad or 'an empty list'}"
                )
            return texts, False
        if not isinstance(messages, Sequence) or not messages:
            raise ConfigError(
                "messages must be a conversation (a list of {'role', 'content'}) or a list of them"
            )
        conversations = [messages] if isinstance(messages[0], Mapping) else list(messages)
        rendered = []
        for i, conversation in enumerate(conversations):
            rendered.append(
                self.tokenizer.apply_chat_template(
                    [self.flatten_message(msg, i) for msg in conversation],
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    **dict(chat_template_kwargs or {}),
                )
            )
        return rendered, True

    def flatten_message(self, message: Any, sample: int = 0) -> dict[str, Any]:
        """One chat message whose content is a list of parts (``{"type": "text", "text": ...}`` or
        ``{"type": "image"}`` for a modality's token name) -> the same message with one string of
        content, one placeholder per item part; a string content is returned as it is. ``sample``
        only numbers the error message."""
        if not isinstance(message, Mapping) or "content" not in message:
            raise ConfigError(
                f"sample {sample}: each message must be a mapping with 'role' and 'content', got {message!r}"
            )
        content = message["content"]
        if isinstance(content, str) or content is None:
            return dict(message)
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text":
                pieces.append(part.get("text", ""))
            elif kind in self.tokens:
                pieces.append(self.tokens[kind])
            elif isinstance(kind, str) and f"<{kind}>" in self.tokens.values():  # {"type": "image"} for "<image>"
                pieces.append(f"<{kind}>")
            else:
                raise ConfigError(
                    f"sample {sample}: unknown message part {part!r}; expected {{'type': 'text', 'text': ...}} "
                    f"or {{'type': m}} for a modality m in {self.modalities}"
                )
        return {**message, "content": "".join(pieces)}

    def _split_items(self, ids: list[list[int]], items: Mapping[str, Any]) -> dict[str, list[list[Any]]]:
        """Items per modality, one list per sample, checked against the placeholders in each sample."""
        unknown = sorted(set(items) - set(self.encoder_processors))
        if unknown:
            raise EncoderInputError(
                f"unknown modality keyword(s) {unknown}; this processor's modalities are {self.modalities}"
            )
        batch = len(ids)
        out: dict[str, list[list[Any]]] = {}
        for m in self.modalities:
            token_id, token = self.token_ids[m], self.tokens[m]
            found = [sum(1 for t in sample if t == token_id) for sample in ids]
            value = items.get(m)
            if value is None:
                for i, n in enumerate(found):
                    if n:
                        raise PlaceholderMismatchError(
                            f"sample {i}: {n} {token} placeholder(s) in the text but no {m} items were given "
                            f"(pass {m}=[...])"
                        )
                continue
            if _is_per_sample(value, batch):
                samples = [list(v) for v in value]
                for i, (n, given) in enumerate(zip(found, samples)):
                    if n != len(given):
                        raise PlaceholderMismatchError(
                            f"sample {i}: {n} {token} placeholder(s) in the text but {len(given)} {m} item(s) given"
                        )
            else:
                flat = value if isinstance(value, list) else [value]
                total = sum(found)
                if total != len(flat):
                    raise PlaceholderMismatchError(_flat_mismatch(m, token, found, len(flat)))
                samples, start = [], 0
                for n in found:
                    samples.append(flat[start : start + n])
                    start += n
            if any(samples):
                out[m] = samples
        return out

    # -- building blocks (also for collators) -------------------------------------------------------------
    def process_items(
        self,
        items: Mapping[str, Sequence[Any]],
        *,
        processor_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
        """Run each modality's processor over its items (in order) and count tokens per item.

        Returns ``(inputs, counts)``: modality -> the processor's output (tensors, one row per item),
        and modality -> how many placeholder tokens each item becomes in the language model's input.
        """
        unknown = sorted(set(items) - set(self.encoder_processors))
        if unknown:
            raise EncoderInputError(
                f"unknown modality keyword(s) {unknown}; this processor's modalities are {self.modalities}"
            )
        inputs: dict[str, dict[str, Any]] = {}
        counts: dict[str, list[int]] = {}
        for m, values in items.items():
            values = list(values)
            if not values:
                continue
            processor = self.encoder_processors[m]
            kwargs = dict((processor_kwargs or {}).get(m, {}))
            if hasattr(processor, "model_input_names"):  # an HF image processor / feature extractor
                kwargs.setdefault("return_tensors", "pt")
            processed = _as_tensors(dict(processor(values, **kwargs)))
            inputs[m] = processed
            counts[m] = self._count(m, values, processed)
        return inputs, counts

    def _count(self, modality: str, items: list[Any], processed: Mapping[str, Any]) -> list[int]:
        counter = self._counters[modality]
        # Cornstarch calls fn(inputs, outputs) with inputs such as {"images": [...]}: _Items is the list
        # of items and, read by any key, that list again, so both forms of function work.
        raw = list(counter(_Items(items), processed))
        if raw and isinstance(raw[0], (list, tuple)):
            raw = [n for sample in raw for n in sample]
        if len(raw) != len(items):
            raise PlaceholderMismatchError(
                f"{modality}: the token count function returned {len(raw)} counts for {len(items)} items"
            )
        project = self._encoders[modality].output_tokens if modality in self._encoders else None
        if isinstance(counter, FixedCount):  # measured through the projector already
            project = None
        return [int(project(int(n))) if project is not None else int(n) for n in raw]

    def expand(
        self, input_ids: Sequence[int], num_tokens: Mapping[str, Sequence[int]], *, sample: int | None = None
    ) -> list[int]:
        """One sample's ids with one placeholder per item -> each placeholder expanded into its
        ``num_tokens[modality][k]`` copies (wrapped when ``wrap``), in order.

        `PlaceholderMismatchError` (naming ``sample``) when the placeholders and counts differ in number.
        """
        where = f"sample {sample}: " if sample is not None else ""
        for m in self.modalities:
            found = sum(1 for t in input_ids if int(t) == self.token_ids[m])
            given = len(num_tokens.get(m, ()))
            if found != given:
                raise PlaceholderMismatchError(
                    f"{where}{found} {self.tokens[m]} placeholder(s) in the text but {given} {m} item(s)"
                )
        unknown = sorted(set(num_tokens) - set(self.token_ids))
        if unknown:
            raise EncoderInputError(
                f"token counts for {unknown}; this processor's modalities are {self.modalities}"
            )
        return expand_placeholders(input_ids, self.token_ids, num_tokens, wrap=self.wrap_token_ids or None)

    def pad(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        labels: Sequence[Sequence[int]] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Pad samples of ids (and ``labels``, with -100) on ``padding_side``; add ``attention_mask``."""
        side = padding_side or self.padding_side or getattr(self.tokenizer, "padding_side", "right")
        if side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {side!r}")
        sequences = [[int(t) for t in s] for s in input_ids]
        lengths = {len(s) for s in sequences}
        if padding and self.tokenizer.pad_token_id is None:
            raise ConfigError(
                "the tokenizer has no padding token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        if not padding and return_tensors is not None and len(lengths) > 1:
            raise ConfigError(
                f"samples have different lengths {sorted(lengths)}; pass padding=True, or return_tensors=None for lists"
            )
        out = dict(
            self.tokenizer.pad(
                {"input_ids": sequences},
                padding=padding,
                max_length=max_length,
                pad_to_multiple_of=pad_to_multiple_of,
                padding_side=side,
                return_attention_mask=True,
                return_tensors=return_tensors,
            )
        )
        if labels is not None:
            if [len(x) for x in labels] != [len(s) for s in sequences]:
                raise ConfigError("labels must have one entry per token of each sample")
            width = len(out["input_ids"][0]) if sequences else 0
            padded = [
                ([-100] * (width - len(x)) + list(x))
                if side == "left"
                else (list(x) + [-100] * (width - len(x)))
                for x in labels
            ]
            out["labels"] = torch.tensor(padded, dtype=torch.long) if return_tensors == "pt" else padded
        return out

    def model_kwargs(self, inputs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Processed items of each modality (modality -> ``{input name: tensor}``) -> the keyword
        arguments of the model's forward: top-level (``pixel_values=``) where the name routes to one
        encoder unambiguously, under ``encoder_inputs={modality: {...}}`` otherwise."""
        owners: dict[str, list[str]] = {}
        for m, processed in inputs.items():
            for key in processed:
                owners.setdefault(key, []).append(m)
        # a name another encoder also takes is nested even when only one modality is in this batch
        # (an image and a video encoder both take pixel_values)
        takers: dict[str, set[str]] = {}
        for m, info in self._encoders.items():
            for key in info.input_names or ():
                takers.setdefault(key, set()).add(m)
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for m, processed in inputs.items():
            takes = self._encoders[m].input_names if m in self._encoders else None
            clash = any(
                key in RESERVED_INPUT_NAMES
                or len(owners[key]) > 1
                or bool(takers.get(key, set()) - {m})
                or (takes is not None and key not in takes)
                for key in processed
            )
            if clash:
                nested[m] = dict(processed)
            else:
                top.update(processed)
        if nested:
            top["encoder_inputs"] = nested
        return top

    # -- save / load ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the tokenizer, ``processor_config.json`` and any HF processor the user gave (in a
        subfolder ``<modality>_processor``) into ``save_directory``, which may already hold the model.

        Plugin processors are not written: they are rebuilt from the recipe in the model's
        ``config.json``. The files are written into a staging copy of the directory that then replaces it
        atomically (`mmcore.files.staged_directory`); files already there (the model) are kept.
        """
        # Everything already in the directory (the model) is kept; what this save writes replaces it.
        with staged_directory(save_directory, keep=lambda name: True, last=(PROCESSOR_CONFIG,)) as staging:
            self.tokenizer.save_pretrained(staging)
            modalities = {}
            for index, (m, processor) in enumerate(self.encoder_processors.items()):
                record: dict[str, Any] = {
                    "token": self.tokens[m],
                    "wrap_tokens": list(wrap_tokens(m)) if m in self.wrap_token_ids else None,
                }
                if m in self._processor_from_plugin:
                    record["processor"] = {"kind": PLUGIN, "encoder": self._encoders[m].source.get("encoder")}
                elif hasattr(inner := unwrap_processor(processor), "save_pretrained") and (
                    _transformers_class_path(inner) is not None
                ):
                    subfolder = (
                        f"{m}_processor" if re.fullmatch(r"[A-Za-z0-9_.-]+", m) else f"processor_{index}"
                    )
                    inner.save_pretrained(staging / subfolder)
                    record["processor"] = {
                        "kind": "saved",
                        "class": _transformers_class_path(inner),
                        "subfolder": subfolder,
                    }
                    if isinstance(processor, ProcessorCall):
                        record["processor"]["call"] = processor.record()
                else:
                    record["processor"] = {"kind": "unsaved", "class": _qualname(processor)}
                if m in self._count_from_plugin:
                    record["num_tokens"] = {"kind": PLUGIN}
                elif _builtin_counter_record(self._counters[m]) is not None:
                    record["num_tokens"] = _builtin_counter_record(self._counters[m])
                else:
                    record["num_tokens"] = {"kind": "function", "name": _qualname(self._counters[m])}
                modalities[m] = record
            config = {
                "processor_class": type(self).__name__,
                "format_version": FORMAT_VERSION,
                "wrap": self.wrap,
                "padding_side": self.padding_side,
                "modalities": modalities,
            }
            (staging / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        model: Any = None,
        *,
        encoder_processors: Mapping[str, Callable[..., Mapping[str, Any]]] | None = None,
        num_feature_calculation_funcs: Mapping[str, NumTokensFn] | None = None,
        padding_side: str | None = None,
        trust_remote_code: bool = False,
        num_tokens: Mapping[str, NumTokensFn] | None = None,
    ) -> MultimodalProcessor:
        """Load a processor saved by `save_pretrained`.

        Plugin processors and counts are rebuilt from the encoders' recipes: ``model``'s when given,
        else the ``config.json`` the model saved into the same directory. Processors or counting
        functions that could not be saved must be passed again (the error says which).
        ``trust_remote_code`` goes to every transformers ``from_pretrained`` call as given (default
        False): a tokenizer or image processor whose files name code (``auto_map``) is refused, never
        asked about on stdin.
        """
        from transformers import AutoTokenizer

        import mmcore.modeling.multimodal  # noqa: F401 - AutoTokenizer reads config.json: model_type "mmcore"

        root = Path(directory)
        config_file = root / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise SerializationError(
                f"{root} has no {PROCESSOR_CONFIG}; was a MultimodalProcessor saved there?"
            )
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            from mmcore.errors import CheckpointError

            raise CheckpointError(f"{config_file}: not valid JSON ({exc}); expected the processor's config") from exc
        if not isinstance(config, dict):
            config = {}
        if config.get("processor_class") != cls.__name__ or config.get("format_version") != FORMAT_VERSION:
            raise SerializationError(
                f"{config_file}: expected processor_class {cls.__name__!r} format_version {FORMAT_VERSION}, got "
                f"{config.get('processor_class')!r} format_version {config.get('format_version')!r}"
            )
        records: dict[str, Any] = config["modalities"]
        given = dict(encoder_processors or {})
        funcs = _counting_functions(num_tokens, num_feature_calculation_funcs)
        unknown = sorted((set(given) | set(funcs)) - set(records))
        if unknown:
            raise ConfigError(
                f"processors/functions given for {unknown}, but the saved modalities are {sorted(records)}"
            )
        if model is not None:
            infos = {m: _info_from_module(model.encoders[m]) for m in records if m in model.encoders}
        else:
            infos = _infos_from_model_config(root, records)
        processors: dict[str, Any] = {}
        from_plugin = set()
        for m, record in records.items():
            saved = record.get("processor") or {}
            if m in given:
                processors[m] = given[m]
            elif saved.get("kind") == PLUGIN:
                info = infos.get(m)
                if info is None or not info.from_plugin:
                    raise SerializationError(
                        f"{m!r}: its processor comes from the recipe of plugin encoder {saved.get('encoder')!r}, but "
                        f"{'the model given' if model is not None else root / 'config.json'} has no plugin encoder "
                        f"{m!r}; save the model into the same directory, or pass model="
                    )
                processors[m] = _plugin_processor(m, info.source)
                from_plugin.add(m)
            elif saved.get("kind") == "saved":
                processors[m] = _load_saved_processor(m, saved, root, trust_remote_code)
                call = saved.get("call")
                if call is not None:
                    if not isinstance(call, Mapping) or set(call) - {"kwargs", "rename"}:
                        raise SerializationError(
                            f"{config_file}: {m!r}: the processor call must be {{'kwargs': ..., 'rename': ...}}, got {call!r}"
                        )
                    processors[m] = ProcessorCall(processors[m], call.get("kwargs"), call.get("rename"))
            else:
                raise SerializationError(
                    f"{m!r}: its processor ({saved.get('class')}) was not saved (it has no save_pretrained or is not "
                    f"a transformers class); pass it again: from_pretrained(..., encoder_processors={{{m!r}: processor}})"
                )
            if m not in funcs and (record.get("num_tokens") or {}).get("kind") == "builtin":
                funcs[m] = _builtin_counter(record["num_tokens"], config_file)
            if m not in funcs and (record.get("num_tokens") or {}).get("kind") != PLUGIN:
                raise SerializationError(
                    f"{m!r}: its token count function ({(record.get('num_tokens') or {}).get('name')}) cannot be "
                    f"saved; pass it again: from_pretrained(..., num_tokens={{{m!r}: fn}})"
                )
        from mmcore.trust import refusing_remote_code

        with refusing_remote_code(f"{root} (tokenizer)"):
            tokenizer = AutoTokenizer.from_pretrained(str(root), trust_remote_code=bool(trust_remote_code))
        processor = cls(
            processors,
            tokenizer,
            model,
            None,
            {m: r["token"] for m, r in records.items() if isinstance(r.get("token"), str)},
            wrap=bool(config.get("wrap")),
            padding_side=padding_side or config.get("padding_side"),
            num_tokens=funcs,
            _encoder_info=None if model is not None else infos,
        )
        processor._processor_from_plugin = from_plugin
        return processor


# -- helpers ------------------------------------------------------------------------------------------------
def _is_per_sample(value: Any, batch: int) -> bool:
    # Only lists group items: a tuple is an item, e.g. Whisper's (waveform, sampling_rate).
    return isinstance(value, list) and len(value) == batch and all(isinstance(v, list) for v in value)


def _flat_mismatch(modality: str, token: str, found: list[int], given: int) -> str:
    total = sum(found)
    if given < total:
        seen = 0
        for i, n in enumerate(found):
            seen += n
            if seen > given:
                return (
                    f"sample {i}: a {token} placeholder has no {modality} item: {given} item(s) given for {total} "
                    f"placeholder(s) in the batch (per sample: {found})"
                )
    last = max((i for i, n in enumerate(found) if n), default=len(found) - 1)
    return (
        f"sample {last}: {given - total} {modality} item(s) left over after the last {token} placeholder: {given} "
        f"item(s) given for {total} placeholder(s) in the batch (per sample: {found})"
    )


def _as_tensors(processed: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays (and lists of them) from an HF processor -> torch tensors; anything else as it is."""
    import numpy as np

    out = {}
    for key, value in processed.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, np.ndarray) for v in value):
            value = torch.from_numpy(np.stack(value))
        out[key] = value
    return out


def _info_from_module(encoder: Any) -> _EncoderInfo:
    projector = getattr(encoder, "projector", None)
    rule = getattr(projector, "token_count_rule", None)
    # light and picklable for data workers unless the projection itself must count
    count = rule() if callable(rule) else getattr(projector, "num_output_tokens", None)
    return _EncoderInfo(source=encoder.source, input_names=tuple(encoder.input_map), output_tokens=count)


def _infos_from_model_config(root: Path, records: Mapping[str, Any]) -> dict[str, _EncoderInfo]:
    """Encoder facts from the ``config.json`` a `MultimodalModel` saved into ``root`` (none if absent)."""
    model_config = root / "config.json"
    if not model_config.is_file():
        return {}
    encoders = json.loads(model_config.read_text()).get("encoders") or {}
    infos = {}
    for m in records:
        record = encoders.get(m)
        if record is None:
            continue
        names = record.get("input_names")
        infos[m] = _EncoderInfo(
            source=record.get("source") or None,
            input_names=tuple(names) if names else None,
            output_tokens=_projector_counter(m, record.get("projector")),
        )
    return infos


def _projector_counter(modality: str, record: Mapping[str, Any] | None) -> Callable[[int], int] | None:
    """The projector's ``num_output_tokens``, from its config record (built on the meta device: no memory)."""
    if not record:
        return None
    from mmcore.modeling.projector import CUSTOM, MultimodalProjector, MultimodalProjectorConfig

    if record.get("projector_type") == CUSTOM:
        return None  # config.json cannot rebuild it; load with model= if it changes the token count
    with torch.device("meta"):
        projector = MultimodalProjector(MultimodalProjectorConfig(**record))
    return projector.token_count_rule()


def _plugin_processor(modality: str, source: Mapping[str, Any]) -> Any:
    from mmcore.factory import factory_for_source

    return factory_for_source(modality, source).processor(source.get("recipe") or {})


class _PluginCounter:
    """The plugin factory's ``num_tokens`` in the counting-function shape (a class, not a closure, so
    a processor inside a DataLoader collator pickles into worker processes)."""

    def __init__(self, modality: str, source: Mapping[str, Any]):
        from mmcore.factory import factory_for_source

        self.factory = factory_for_source(modality, source)
        self.recipe = dict(source.get("recipe") or {})

    def __call__(self, items: Sequence[Any], processed: Mapping[str, Any]) -> list[int]:
        return [int(n) for n in self.factory.num_tokens(self.recipe, processed)]


def _qualname(obj: Any) -> str:
    target = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(obj).__name__)}"


def unwrap_processor(processor: Any) -> Any:
    """The transformers processor a `ProcessorCall` calls; any other processor itself."""
    return processor.processor if isinstance(processor, ProcessorCall) else processor


def _transformers_class_path(obj: Any) -> str | None:
    """``module.Class`` of ``obj``'s class when transformers defines it (the only code a saved directory
    may name for loading), else None."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__name__}" if cls.__module__.split(".")[0] == "transformers" else None


def _load_saved_processor(modality: str, record: Mapping[str, Any], root: Path, trust_remote_code: bool) -> Any:
    import importlib

    path = str(record.get("class", ""))
    module_name, _, name = path.rpartition(".")
    cls = None
    if module_name.split(".")[0] == "transformers":
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            cls = None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise SerializationError(f"{modality!r}: saved processor class {path!r} is not a transformers class")
    return cls.from_pretrained(str(root / record["subfolder"]), trust_remote_code=bool(trust_remote_code))


# Token counters of mmcore's own (e.g. `mmcore.builtin.anyres.AnyResTokenCount`) are saved by class and
# parameters and rebuilt at load; only classes inside mmcore are rebuilt this way (no other code runs).
_BUILTIN_COUNTERS = (
    "mmcore.builtin.anyres:AnyResTokenCount",
    "mmcore.builtin.qwen2_audio:Qwen2AudioTokenCount",
    "mmcore.builtin.video:VideoTokenCount",
    "mmcore.processing:FixedCount",
)


class _Items(list):
    """The items of one modality; ``items["images"]`` (any string key) is the list too, for counting
    functions written for Cornstarch's ``fn(inputs, outputs)``."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return list(self)
        return super().__getitem__(key)

    def get(self, key, default=None):
        return list(self)

    def keys(self):
        return ("items",)


class ProcessorCall:
    """A transformers processor called the way a checkpoint calls it: with fixed keyword arguments,
    its outputs renamed. Qwen2-Audio's processor calls its ``WhisperFeatureExtractor`` with
    ``padding="max_length", return_attention_mask=True`` and renames ``attention_mask`` to
    ``feature_attention_mask`` (the text's ``attention_mask`` is never an encoder's input):

    >>> ProcessorCall(feature_extractor, {"padding": "max_length", "return_attention_mask": True},
    ...               rename={"attention_mask": "feature_attention_mask"})          # doctest: +SKIP

    `MultimodalProcessor.save_pretrained` writes the transformers processor's files and records the
    call (JSON values only); ``from_pretrained`` rebuilds it."""

    def __init__(
        self, processor: Any, kwargs: Mapping[str, Any] | None = None, rename: Mapping[str, str] | None = None
    ):
        self.processor = processor
        self.kwargs = dict(kwargs or {})
        self.rename = dict(rename or {})
        try:
            json.dumps(self.kwargs)
        except TypeError as exc:
            raise ConfigError(f"ProcessorCall kwargs must be JSON values (they are saved), got {self.kwargs!r}") from exc
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.rename.items()):
            raise ConfigError(f"ProcessorCall rename must map output names to names, got {self.rename!r}")
        names = list(getattr(processor, "model_input_names", None) or ())
        #: the outputs' names after the renaming (an HF processor's attribute: tensors are asked for)
        self.model_input_names = [self.rename.get(n, n) for n in names]

    def __repr__(self) -> str:
        return f"ProcessorCall({type(self.processor).__name__}, {self.kwargs!r}, rename={self.rename!r})"

    def __call__(self, items: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.processor(items, **{**self.kwargs, **kwargs})
        return {self.rename.get(k, k): v for k, v in dict(out).items()}

    def record(self) -> dict[str, Any]:
        return {"kwargs": self.kwargs, "rename": self.rename}


class FixedCount:
    """Every item becomes ``n`` tokens (a fixed-size image processor before a fixed-length encoder)."""

    def __init__(self, n: int):
        self.n = int(n)

    def params(self) -> dict[str, Any]:
        return {"n": self.n}

    def __call__(self, items: Sequence[Any], processed: Mapping[str, Any]) -> list[int]:
        return [self.n] * len(items)


def _default_counter(encoder: Any, processor: Any) -> Any:
    """A token count for an encoder no plugin built: the count its ``postprocess_projector`` callback
    gives (``token_count()``: LLaVA-NeXT / OneVision tiling per image, video pooling per video,
    Qwen2-Audio's trim per clip), else, for a fixed-size image processor (CLIP, SigLIP, ...), the count
    measured once on a blank image through the encoder and projector. None when neither applies (the
    caller then asks for ``num_tokens``)."""
    token_count = getattr(getattr(encoder, "postprocess_projector_callback", None), "token_count", None)
    if callable(token_count):
        return token_count()
    if "pixel_values" not in (getattr(processor, "model_input_names", None) or ()):
        return None
    try:
        from PIL import Image

        pixels = processor([Image.new("RGB", (64, 48))], return_tensors="pt")["pixel_values"]
        if pixels.dim() != 4:  # tiles or patches: the count depends on the image
            return None
        parameter = next(encoder.parameters())
        with torch.no_grad():
            features = encoder(**{encoder.input_map.get("pixel_values", "pixel_values"): pixels.to(parameter.device, parameter.dtype)})
    except Exception:  # a meta-device model, an encoder that wants more inputs: no default
        return None
    rows = features[0].shape[0] if isinstance(features, list) else features.shape[-2]
    return FixedCount(rows)


def _builtin_counter_record(counter: Any) -> dict[str, Any] | None:
    path = f"{type(counter).__module__}:{type(counter).__qualname__}"
    if path not in _BUILTIN_COUNTERS or not callable(getattr(counter, "params", None)):
        return None
    return {"kind": "builtin", "class": path, "params": counter.params()}


def _builtin_counter(record: Mapping[str, Any], where: Path) -> Any:
    import importlib

    path = record.get("class")
    if path not in _BUILTIN_COUNTERS:
        raise SerializationError(f"{where}: unknown built-in token counter {path!r}; expected one of {_BUILTIN_COUNTERS}")
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)(**(record.get("params") or {}))
    except (TypeError, ConfigError) as exc:
        raise SerializationError(f"{where}: token counter {path} cannot be rebuilt from {record.get('params')!r}: {exc}") from exc
