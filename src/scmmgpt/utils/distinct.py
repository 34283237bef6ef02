"""Each distinct item once: the de-duplication behind "encode each distinct text once"."""

from __future__ import annotations

from typing import Hashable, Sequence

__all__ = ["distinct"]


def distinct(items: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """``(first, inverse)``: the position of each distinct item's first occurrence, in order of
    appearance, and for every position the index of its item among the distinct ones
    (``items[i] == items[first[inverse[i]]]``)."""
    index: dict[Hashable, int] = {}
    first: list[int] = []
    inverse: list[int] = []
    for i, item in enumerate(items):
        if item not in index:
            index[item] = len(first)
            first.append(i)
        inverse.append(index[item])
    return first, inverse
