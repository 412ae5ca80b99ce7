"""The KV cache reaches the language model under the name its forward takes.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40);
mmcore must pass the cache by whichever name the language model declares, and pass neither name
when there is no cache, so its own calls are warning-free on the pinned and the newest release.
"""

from __future__ import annotations

import inspect

import torch

from mmcore.testing import tiny_multimodal_model


def _wrap_forward(llm, cache_name: str, calls: list[dict]):
    """Give ``llm`` a forward that declares its cache as ``cache_name`` and records what it got."""
    original = llm.forward
    native = "cache" if "cache" in inspect.signature(original).parameters else "past_key_values"

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                use_cache=None, **kwargs):  # fmt: skip
        calls.append(dict(kwargs))
        kv = kwargs.pop(cache_name, None)
        other = "past_key_values" if cache_name == "cache" else "cache"
        assert other not in kwargs, f"the cache came as {other!r}, but this model takes {cache_name!r}"
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                        **({native: kv} if kv is not None else {}), **kwargs)  # fmt: skip

    params = [p for p in inspect.signature(forward).parameters.values() if p.kind != p.VAR_KEYWORD]
    params.append(inspect.Parameter(cache_name, inspect.Parameter.KEYWORD_ONLY, default=None))
    params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
    forward.__signature__ = inspect.Signature(params)
    llm.forward = forward


def _prompt(mllm, tokenizer):
    ids = [tokenizer.bos_token_id] + [mllm.config.modality_token_ids["vision"]] * 4
    ids += tokenizer("describe it", add_special_tokens=False).input_ids
    return torch.tensor([ids])


@torch.no_grad()
def test_generation_passes_the_cache_by_the_language_models_own_name():
    reference, tokenizer = tiny_multimodal_model()
    expected_ids = None
    for cache_name in ("cache", "past_key_values"):
        torch.manual_seed(0)
        mllm, _ = tiny_multimodal_model()
        mllm.load_state_dict(reference.state_dict())
        mllm.eval()
        calls: list[dict] = []
        _wrap_forward(mllm.language_model, cache_name, calls)
        input_ids = _prompt(mllm, tokenizer)
        pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
        out = mllm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                            do_sample=False, max_new_tokens=4, min_new_tokens=4, use_cache=True)  # fmt: skip
        decode_steps = [c for c in calls[1:]]
        assert decode_steps and all(c.get(cache_name) is not None for c in decode_steps), cache_name
        if expected_ids is None:
            expected_ids = out.tolist()
        assert out.tolist() == expected_ids  # the same greedy continuation whichever name the cache goes by


def test_a_forward_without_cache_passes_no_cache_argument():
    mllm, tokenizer = tiny_multimodal_model()
    calls: list[dict] = []
    _wrap_forward(mllm.language_model, "cache", calls)
    input_ids = _prompt(mllm, tokenizer)
    pixel_values = torch.randn(1, 3, 28, 28)
    mllm.train()
    out = mllm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values, labels=input_ids)
    out.loss.backward()
    assert calls and "cache" not in calls[0] and "past_key_values" not in calls[0]
