"""Which candidate node to split next (VisionLeaf §3.2; ``low`` and ``random`` are the ablations).

A strategy gets the candidates' entropies and a seeded RNG and returns the index to split. Register your
own with ``@SELECTION_STRATEGIES.register("name")``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from visionleaf.registry import Registry

SelectionStrategy = Callable[[Sequence[float], random.Random], int]
"""(entropies of the candidates, rng) -> index of the candidate to split."""

SELECTION_STRATEGIES: Registry[SelectionStrategy] = Registry("selection strategy")


@SELECTION_STRATEGIES.register("high")
def highest_entropy(entropies: Sequence[float], rng: random.Random) -> int:
    """Split the most uncertain node (ties: the first)."""
    return max(range(len(entropies)), key=entropies.__getitem__)


@SELECTION_STRATEGIES.register("low")
def lowest_entropy(entropies: Sequence[float], rng: random.Random) -> int:
    """Split the most certain node (ablation)."""
    return min(range(len(entropies)), key=entropies.__getitem__)


@SELECTION_STRATEGIES.register("random")
def random_node(entropies: Sequence[float], rng: random.Random) -> int:
    """Split a uniformly random node (ablation); reproducible through the sampler's seed."""
    return rng.randrange(len(entropies))
