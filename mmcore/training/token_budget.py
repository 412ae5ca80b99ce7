"""`TokenBudgetBatchSampler`: batches of roughly equal token count rather than equal sample count.

Beside `GroupedBatchSampler` (a fixed number of samples per batch) and built the same way: the
same seeded shuffle, the same optional grouping by modality, the same length function
(``dataset.length(i)``, see `TokenBudgetBatchSampler.for_dataset`), the same split of each global
batch across ranks. Each batch's lengths sum to at most ``max_tokens``: within a window of a few
budgets' worth of shuffled samples, the samples are packed first-fit decreasing into batches
(`mmcore.training.packing.plan_rows`), so batches come out nearly full; the batch order is shuffled.
With ``MultimodalCollator(processor, pack_to=max_tokens)`` each batch becomes one packed row; with
``row_tokens=N`` and ``pack_to=N``, each batch is ``max_tokens // N`` packed rows (one forward and
backward pass for several rows: fewer, larger passes).

>>> sampler = TokenBudgetBatchSampler(lengths, max_tokens=4096)                  # doctest: +SKIP
>>> loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator)    # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from mmcore.errors import ConfigError
from mmcore.training.data import StepBatchSampler
from mmcore.training.packing import plan_rows


class TokenBudgetBatchSampler(StepBatchSampler):
    """Batches whose lengths sum to at most ``max_tokens`` (a longer sample is a batch of its own).

    Args:
        lengths: each sample's length: its token count, or any estimate in the units of
            ``max_tokens`` (`ConversationDataset.length` counts characters of the conversation).
        max_tokens: the budget of one batch (per process).
        row_tokens: batches of several packed rows: each batch is ``max_tokens // row_tokens`` rows
            of at most ``row_tokens`` tokens each, listed row after row, rows of similar fill
            batched together, for ``MultimodalCollator(processor, pack_to=row_tokens)``, which packs
            them into those rows (a packed batch is padded to its longest row, so similar rows pad
            least). None: one row per batch (``pack_to=max_tokens``), or padded batches.
        groups: each sample's group (`ConversationDataset.modality_key`); every batch, and every
            step's global batch, holds one group only. None: one group.
        world_size, rank: each step takes ``world_size`` batches of one group; rank ``r`` gets the
            ``r``-th (so all ranks run the same encoders at each step). Incomplete steps are dropped.
        seed: the order depends only on ``seed`` and the epoch (`set_epoch`).
        window: samples are packed into batches within windows of ``window x world_size x max_tokens``
            tokens of shuffled samples (larger: fuller batches, less randomness).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        row_tokens: int | None = None,
        groups: Sequence[str] | None = None,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        window: int = 8,
    ):
        if max_tokens < 1:
            raise ConfigError(f"the token budget of a batch must be >= 1, got {max_tokens}")
        if row_tokens is not None and not 1 <= row_tokens <= max_tokens:
            raise ConfigError(
                f"the tokens of a packed row must be between 1 and the batch's budget {max_tokens}, got {row_tokens}"
            )
        if groups is not None and len(groups) != len(lengths):
            raise ConfigError(f"{len(groups)} groups for {len(lengths)} samples")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens, self.row_tokens, self.window = max_tokens, row_tokens, window
        self._setup(
            groups if groups is not None else ["all"] * len(self.lengths), world_size, rank, seed,
            empty=f"no modality group fills {world_size} batch(es) of up to {max_tokens} tokens "
            f"({world_size} processes); lower the token budget",
        )  # fmt: skip

    def _global_batches(self, epoch: int) -> list[list[list[int]]]:
        rng, by_group = self._epoch_start(epoch)
        window = self.window * self.world_size * self.max_tokens
        capacity = self.row_tokens or self.max_tokens
        per_batch = self.max_tokens // capacity  # rows per batch
        steps: list[list[list[int]]] = []
        for group in sorted(by_group):
            indices = by_group[group]
            rng.shuffle(indices)
            batches: list[list[int]] = []
            carried: list[int] = []
            start = 0
            while start < len(indices) or carried:
                end, tokens = start, sum(self.lengths[i] for i in carried)
                while end < len(indices) and (tokens < window or end == start):
                    tokens += self.lengths[indices[end]]
                    end += 1
                chunk = carried + indices[start:end]
                plan = plan_rows([self.lengths[i] for i in chunk], capacity)
                rows = [[chunk[k] for k in row] for row in plan]
                last = end >= len(indices)
                # the few rows first-fit decreasing leaves part-empty wait for the next window's samples
                full = [r for r in rows if last or self._fill(r) >= 0.9 * capacity]
                carried = [i for r in rows if r not in full for i in r]
                if per_batch > 1:  # rows of similar fill batched together; rows short of a batch wait too
                    full.sort(key=self._fill)
                    keep = len(full) if last else len(full) - len(full) % per_batch
                    carried += [i for r in full[keep:] for i in r]
                    full = [sum(full[s : s + per_batch], []) for s in range(0, keep, per_batch)]
                batches += full
                start = end
            rng.shuffle(batches)
            size = self.world_size
            steps += [batches[s : s + size] for s in range(0, len(batches) - size + 1, size)]
        rng.shuffle(steps)
        return steps

    def _fill(self, row: list[int]) -> int:
        return sum(self.lengths[i] for i in row)

    def __iter__(self) -> Iterator[list[int]]:
        for step in self._global_batches(self.epoch):
            yield step[self.rank]

    @classmethod
    def for_dataset(
        cls, dataset: Any, max_tokens: int, *, group_by_modality: bool = True, **kwargs: Any
    ) -> TokenBudgetBatchSampler:
        """From a dataset with ``length(i)`` (and ``modality_key(i)`` to group by, as
        `ConversationDataset` and `GroupedBatchSampler.for_dataset` read them)."""
        n = len(dataset)
        if not hasattr(dataset, "length"):
            raise ConfigError(
                f"a token budget needs each sample's length: {type(dataset).__name__} has no length(i) method"
            )
        lengths = [dataset.length(i) for i in range(n)]
        groups = (
            [dataset.modality_key(i) for i in range(n)]
            if group_by_modality and hasattr(dataset, "modality_key")
            else None
        )
        return cls(lengths, max_tokens, groups=groups, **kwargs)
