"""config.json for a `MultimodalModel`: recording each part so the directory rebuilds it, and
rebuilding it at load; plus the load's checks (a bad checkpoint file is a typed error).

The model file keeps the modelling; this module is everything that turns a live model into the
records of `MultimodalConfig` and back (encoders, callbacks, projectors, PEFT adapters), and what
`MultimodalModel.from_pretrained` checks around transformers' own loader. The record format is
described in `mmcore.modeling.configuration`.
"""

from __future__ import annotations

import contextvars
import importlib
import os
from collections.abc import Mapping
from typing import Any

import transformers
from torch import nn
from transformers import PreTrainedModel

from mmcore.builtin.callbacks import SLOTS, build_callback, record_callback
from mmcore.errors import ConfigError, SerializationError, UnrecordableCallbackError
from mmcore.modeling.adapters import adapter_configs
from mmcore.modeling.configuration import MultimodalConfig
from mmcore.modeling.encoder import ModalEncoderModule
from mmcore.modeling.projector import CUSTOM, MultimodalProjector, MultimodalProjectorConfig

#: A callback record for a callback that could not be recorded (it must be passed again at load).
UNRECORDED = "unrecorded"


def record_encoders(encoders: Mapping[str, ModalEncoderModule], strict: bool) -> dict[str, Any]:
    """The ``config.encoders`` records (see `mmcore.modeling.configuration`) of ``encoders``; a callback
    that cannot be recorded raises `UnrecordableCallbackError` when ``strict``, else is marked `UNRECORDED`."""
    records = {}
    for name, encoder in encoders.items():
        callbacks = {}
        for slot, callback in encoder.callbacks().items():
            if callback is None:
                continue
            try:
                callbacks[slot] = record_callback(callback, f"encoder {name!r} {slot} callback")
            except UnrecordableCallbackError:
                if strict:
                    raise
                callbacks[slot] = UNRECORDED
        records[name] = {
            "source": _record_source(encoder),
            "input_names": dict(encoder.input_map),
            "output_width": encoder._output_width,
            "projector": encoder.projector.config.to_diff_dict() | {
                "projector_type": encoder.projector.config.projector_type,
                "in_features": encoder.projector.config.in_features,
                "out_features": encoder.projector.config.out_features,
            },
            "callbacks": callbacks,
        }
        if encoder.additional_args:
            records[name]["additional_args"] = list(encoder.additional_args)
        adapters = adapter_configs(encoder.module)  # LoRA injected in place (mmcore.training)
        if adapters:
            records[name]["peft_config"] = adapters
    return records


def build_encoders(
    config: MultimodalConfig,
    encoder_modules: Mapping[str, nn.Module],
    callbacks: Mapping[str, Mapping[str, Any]],
) -> dict[str, ModalEncoderModule]:
    """Each encoder of ``config.encoders`` rebuilt from its record: its module from the recorded source
    (a plugin's recipe or a transformers class; ``encoder_modules`` for others), LoRA adapters, callbacks
    (registered names; import paths only with ``trust_remote_code``) and projector."""
    unknown = set(encoder_modules) - set(config.encoders)
    if unknown:
        raise ConfigError(f"encoder_modules names {sorted(unknown)} not in the saved model ({sorted(config.encoders)})")
    built = {}
    for name, record in config.encoders.items():
        given = encoder_modules.get(name)
        if isinstance(given, ModalEncoderModule):
            built[name] = given
            continue
        module = given if given is not None else _build_source(name, record.get("source") or {})
        if record.get("peft_config") and getattr(module, "peft_config", None) is None:
            _inject_adapters(module, record["peft_config"])
        slots = {}
        for slot in SLOTS:
            override = callbacks.get(name, {}).get(slot)
            rec = (record.get("callbacks") or {}).get(slot)
            if override is not None:
                slots[slot] = override
            elif rec == UNRECORDED:
                raise SerializationError(
                    f"encoder {name!r}: its {slot} callback was not recorded at save time; pass it again: "
                    f"from_pretrained(..., callbacks={{{name!r}: {{{slot!r}: fn}}}})"
                )
            elif rec is not None:
                slots[slot] = build_callback(
                    rec, f"encoder {name!r} {slot} callback", trust_remote_code=TRUST_REMOTE_CODE.get()
                )
        projector_record = record.get("projector")
        projector = None
        if projector_record is not None:
            projector_config = MultimodalProjectorConfig(**projector_record)
            if projector_config.projector_type == CUSTOM:
                raise SerializationError(
                    f"encoder {name!r}: its projector is a custom module config.json cannot rebuild; pass the "
                    f"whole encoder again: from_pretrained(..., encoder_modules={{{name!r}: ModalEncoderModule(module, projector=...)}})"
                )
            projector = MultimodalProjector(projector_config)
        built[name] = ModalEncoderModule(
            module,
            projector,
            slots.get("preprocess"),
            slots.get("postprocess_module"),
            slots.get("postprocess_projector"),
            additional_args=record.get("additional_args") or (),
            input_names=record.get("input_names"),
            output_width=record.get("output_width"),
            source=record.get("source") if (record.get("source") or {}).get("kind") == "plugin" else None,
        )
    return built


def record_llm_callback(callback: Any, strict: bool) -> Any:
    """The record of the model's ``preprocess_llm`` callback (`UNRECORDED` when it cannot be recorded
    and ``strict`` is off)."""
    if callback is None:
        return None
    try:
        return record_callback(callback, "preprocess_llm callback")
    except UnrecordableCallbackError:
        if strict:
            raise
        return UNRECORDED


def build_llm_callback(config: MultimodalConfig, callbacks: Mapping[str, Any]) -> Any:
    """The model's ``preprocess_llm`` callback from its record (``callbacks["preprocess_llm"]`` overrides)."""
    given = callbacks.get("preprocess_llm")
    record = config.preprocess_llm_callback
    if given is not None:
        return given
    if record == UNRECORDED:
        raise SerializationError(
            "the preprocess_llm callback was not recorded at save time; pass it again: "
            "from_pretrained(..., callbacks={'preprocess_llm': fn})"
        )
    if record is None:
        return None
    return build_callback(record, "preprocess_llm callback", trust_remote_code=TRUST_REMOTE_CODE.get())


# Set by MultimodalModel.from_pretrained for the duration of one load (default: trust nothing).
TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("mmcore_trust_remote_code", default=False)


def load_checked(load, path, *args, **kwargs):
    """``load(path, ...)`` with a bad checkpoint file turned into a `CheckpointError` naming the file."""
    import json
    import pickle

    from safetensors import SafetensorError

    from mmcore.errors import CheckpointError

    where = str(path)
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise CheckpointError(f"{where}: no config.json; expected a directory written by save_pretrained")
        try:
            with open(config, encoding="utf-8") as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config}: not valid JSON ({exc}); expected the model's config") from exc
    report = _HeldLoadReport()
    try:
        with report:
            loaded = load(path, *args, **kwargs)
    except SafetensorError as exc:
        raise CheckpointError(
            f"{where}: a .safetensors weights file is truncated or corrupt ({exc}); save the model again"
        ) from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{where}: pytorch_model.bin holds more than tensors and was refused (loaded weights_only): "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "ignore_mismatched_sizes" not in str(exc):
            raise
        mismatch = report.first_row("MISMATCH")
        raise CheckpointError(
            f"{where}: the weights' sizes do not match config.json"
            + (f" ({mismatch})" if mismatch else "")
            + "; expected a checkpoint saved with this config"
        ) from exc
    report.release()  # a load that worked: HF's report (missing or unexpected keys) is shown as usual
    return loaded


class _HeldLoadReport:
    """Holds transformers' LOAD REPORT warning during a load: a load that fails on mismatched sizes is
    one `CheckpointError` line naming the first mismatched weight, not a table and then an error."""

    # where transformers logs the report from (modeling_utils passes its own logger; the default is
    # loading_report's)
    LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")

    def __init__(self) -> None:
        import logging

        self.loggers = [logging.getLogger(name) for name in self.LOGGERS]
        self.records: list[logging.LogRecord] = []

    def filter(self, record) -> bool:
        if "LOAD REPORT" not in str(record.msg):
            return True
        self.records.append(record)
        return False

    def __enter__(self):
        for logger in self.loggers:
            logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for logger in self.loggers:
            logger.removeFilter(self)

    def first_row(self, status: str) -> str | None:
        """``key: detail`` of the report's first row with this status, ANSI colours removed."""
        import re

        for record in self.records:
            for line in re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()).splitlines():
                cells = [c.strip() for c in line.split("|")]
                if len(cells) >= 3 and cells[1] == status:
                    return f"{cells[0]}: {cells[2]}" if cells[2] else cells[0]
        return None

    def release(self) -> None:
        import logging

        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.records.clear()


# Files a model save writes; anything else already in the directory (the tokenizer, a processor saved
# first) is carried over when the model is saved into it again, as with HF's in-place save.
MODEL_FILES = ("config.json", "generation_config.json", "model*.safetensors*", "pytorch_model*.bin*")


def _record_source(encoder: ModalEncoderModule) -> dict[str, Any]:
    if encoder.source is not None:
        return dict(encoder.source)
    module = encoder.module
    cls = type(module)
    if isinstance(module, PreTrainedModel) and cls.__module__.split(".")[0] == "transformers":
        path = cls.__name__ if getattr(transformers, cls.__name__, None) is cls else f"{cls.__module__}.{cls.__name__}"
        return {"kind": "transformers", "class": path, "config": module.config.to_dict()}
    return {"kind": "external", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _transformers_class(path: str) -> Any:
    """A class from the transformers package only: an encoder recorded as ``kind: transformers`` never
    imports code from elsewhere (callbacks recorded by import path are gated by ``trust_remote_code``)."""
    if "." not in path:
        return getattr(transformers, path, None)
    module_name, _, name = path.rpartition(".")
    if module_name.split(".")[0] != "transformers":
        return None
    try:
        return getattr(importlib.import_module(module_name), name, None)
    except ImportError:
        return None


def _inject_adapters(module: nn.Module, adapters: Mapping[str, Any]) -> None:
    """Re-inject the PEFT adapters an encoder was saved with, so its saved weights find their places."""
    import peft

    for adapter_name, record in adapters.items():
        peft.inject_adapter_in_model(peft.PeftConfig.from_peft_type(**record), module, adapter_name=adapter_name)


def _build_source(name: str, source: Mapping[str, Any]) -> nn.Module:
    kind = source.get("kind")
    if kind == "transformers":
        cls = _transformers_class(source.get("class", ""))
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
            raise SerializationError(f"encoder {name!r}: {source.get('class')!r} is not a transformers model class")
        config = cls.config_class.from_dict(dict(source["config"]))
        return cls._from_config(config)
    if kind == "plugin":
        from mmcore.factory import factory_for_source

        return factory_for_source(name, source).build_module(source.get("recipe") or {}, None)
    if kind == "external":
        raise SerializationError(
            f"encoder {name!r}: its module ({source.get('class')}) is not a transformers model and was saved "
            f"without a recipe; pass it again: from_pretrained(..., encoder_modules={{{name!r}: module}})"
        )
    raise SerializationError(f"encoder {name!r}: unknown source kind {kind!r} in config.json")

