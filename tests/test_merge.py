"""The vectorized merge: placement, counts, variable-length items, gradients, no host syncs."""

import pytest
import torch

from mmcore import expand_placeholders, merge_modality_features
from mmcore.errors import PlaceholderMismatchError, TokenIdError
from mmcore.modeling.merge import flatten_features, placeholder_masks
from mmcore.testing import count_host_syncs

V, A = 50, 51  # placeholder ids


def loop_reference(embeds, input_ids, features, token_ids):
    """The per-sample Python loop LLaVA-style code uses; the merge must agree with it."""
    out = embeds.clone()
    cursor = {m: 0 for m in features}
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1]):
            for m, tid in token_ids.items():
                if input_ids[b, t] == tid:
                    out[b, t] = features[m][cursor[m]]
                    cursor[m] += 1
    return out


def batch():
    # sample 0: text, 2 images, text, audio ; sample 1: audio, text, image (interleaved, several items)
    ids = torch.tensor(
        [
            [1, V, V, 2, V, V, 3, A, A, A, 4],
            [A, A, A, 5, 6, 7, V, V, 8, 9, 9],
        ]
    )
    torch.manual_seed(0)
    embeds = torch.randn(2, 11, 8)
    feats = {"vision": torch.randn(3, 2, 8), "audio": torch.randn(2, 3, 8)}
    return ids, embeds, feats


def test_merge_matches_per_sample_loop_with_interleaved_modalities():
    ids, embeds, feats = batch()
    token_ids = {"vision": V, "audio": A}
    flat = {m: flatten_features(f, m) for m, f in feats.items()}
    merged = merge_modality_features(embeds, placeholder_masks(ids, token_ids), flat)
    assert torch.equal(merged, loop_reference(embeds, ids, flat, token_ids))
    # text positions untouched
    text = (ids != V) & (ids != A)
    assert torch.equal(merged[text], embeds[text])


def test_variable_length_items_as_a_list():
    ids = torch.tensor([[V, V, V, 1, V, 2]])
    embeds = torch.zeros(1, 6, 4)
    items = [torch.ones(3, 4), 2 * torch.ones(1, 4)]
    merged = merge_modality_features(embeds, {"vision": ids == V}, {"vision": flatten_features(items, "vision")})
    assert merged[0, :3].eq(1).all() and merged[0, 4].eq(2).all() and merged[0, 3].eq(0).all()


@pytest.mark.parametrize("n_features", [4, 6])
def test_count_mismatch_names_modality_and_both_numbers(n_features):
    ids = torch.tensor([[1, V, V, V, V, V, 2]])
    with pytest.raises(PlaceholderMismatchError, match=f"vision: 5 placeholder tokens but {n_features} features"):
        merge_modality_features(torch.zeros(1, 7, 4), {"vision": ids == V}, {"vision": torch.zeros(n_features, 4)}, "eager")


def test_width_mismatch_is_an_error():
    ids = torch.tensor([[V]])
    with pytest.raises(PlaceholderMismatchError, match="width 3 but .* width 4"):
        merge_modality_features(torch.zeros(1, 1, 4), {"vision": ids == V}, {"vision": torch.zeros(1, 3)})


def test_gradients_reach_the_right_feature_rows():
    ids, embeds, feats = batch()
    flat = {m: flatten_features(f, m).requires_grad_() for m, f in feats.items()}
    embeds.requires_grad_()
    masks = placeholder_masks(ids, {"vision": V, "audio": A})
    weights = torch.randn(2, 11, 8)
    (merge_modality_features(embeds, masks, flat) * weights).sum().backward()
    # row k of vision features receives the weight at the k-th vision placeholder
    assert torch.equal(flat["vision"].grad, weights[masks["vision"]])
    assert torch.equal(flat["audio"].grad, weights[masks["audio"]])
    assert torch.equal(embeds.grad[masks["vision"]], torch.zeros_like(embeds.grad[masks["vision"]]))


@pytest.mark.parametrize("check", ["eager", "async"])
def test_in_place_merge_writes_the_given_tensor_with_the_same_values_and_gradients(check):
    ids, embeds, feats = batch()
    masks = placeholder_masks(ids, {"vision": V, "audio": A})
    weights = torch.randn(2, 11, 8)
    results = []
    for inplace in (False, True):
        leaf = embeds.clone().requires_grad_()
        flat = {m: flatten_features(f, m).requires_grad_() for m, f in feats.items()}
        lookup = leaf * 1.0  # stands for a fresh embedding lookup: not a leaf, owned by the caller
        merged = merge_modality_features(lookup, masks, flat, check, inplace=inplace)
        assert (merged is lookup) == inplace
        assert torch.equal(lookup[~(masks["vision"] | masks["audio"])], embeds[~(masks["vision"] | masks["audio"])])
        (merged * weights).sum().backward()
        results.append((merged.detach(), leaf.grad, flat["vision"].grad, flat["audio"].grad))
    for copied, in_place in zip(*results):
        assert torch.equal(copied, in_place)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        merge_modality_features(embeds.clone().requires_grad_(), masks, flat, check, inplace=True)


def test_no_host_sync_in_forward_or_backward():
    """With the device-side count check, neither pass reads a value back (.item, nonzero, masked_select)."""
    ids, embeds, feats = batch()
    flat = {m: flatten_features(f, m).requires_grad_() for m, f in feats.items()}
    masks = placeholder_masks(ids, {"vision": V, "audio": A})
    for inplace in (False, True):
        lookup = embeds.clone().requires_grad_() * 1.0
        with count_host_syncs() as syncs:
            merge_modality_features(lookup, masks, flat, check="async", inplace=inplace).sum().backward()
        assert not syncs, syncs
    with count_host_syncs() as syncs:  # the recorder sees a sync when there is one: the eager check's
        merge_modality_features(embeds, masks, flat, check="eager")
    assert syncs == {"tolist": 1}


def test_expand_placeholders_expands_and_wraps_in_order():
    ids = [7, V, 8, A, V]
    out = expand_placeholders(ids, {"vision": V, "audio": A}, {"vision": [2, 3], "audio": [1]}, wrap={"vision": (90, 91)})
    assert out == [7, 90, V, V, 91, 8, A, 90, V, V, V, 91]


@pytest.mark.parametrize(
    "ids, items, message",
    [([V], [1, 1], "2 items given but 1 placeholders"), ([V, V], [1], "more placeholders in the text than items")],
)
def test_expand_placeholders_counts_items(ids, items, message):
    with pytest.raises(PlaceholderMismatchError, match=message):
        expand_placeholders(ids, {"vision": V}, {"vision": items})


def test_expand_placeholders_rejects_shared_ids():
    with pytest.raises(TokenIdError):
        expand_placeholders([V], {"vision": V, "audio": V}, {"vision": [1]})
