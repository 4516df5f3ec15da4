"""Which micro-batch sizes the search may choose, and the search over them: plain values, no device."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def micro_batch_sizes(batch_size: int, upper: int) -> list[int]:
    """The micro-batch sizes up to ``upper`` (the user's --train.micro_batch_size) whose steps hold the same samples
    as at ``upper``, largest first. A step takes ``batch_size // size`` micro-batches (``batch_size``: samples, or packed
    rows, per rank per step), so a size qualifies when it divides the step and takes the same number of samples."""
    step = batch_size // upper * upper
    return [size for size in range(min(upper, step), 0, -1) if step % size == 0 and batch_size // size * size == step]


def largest_that_fits(sizes: Sequence[int], fits: Callable[[int], bool]) -> int | None:
    """The largest of ``sizes`` (largest first) for which ``fits(size)`` is true, trying the first, then halving the
    rest (a size that fits means every smaller one does); None when none fits. ``fits`` runs once per size tried."""
    if not sizes:
        return None
    if fits(sizes[0]):
        return sizes[0]
    best, low, high = None, 1, len(sizes) - 1
    while low <= high:
        middle = (low + high) // 2
        if fits(sizes[middle]):
            best, high = sizes[middle], middle - 1
        else:
            low = middle + 1
    return best
