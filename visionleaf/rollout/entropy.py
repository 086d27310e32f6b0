"""Node entropy estimators: the entropy of the first token after a node, from its top-k logprobs.

VisionLeaf (§3.2) scores a node by the entropy of its next-token distribution and uses min-entropy for
efficiency. Register your own with ``@ENTROPY_ESTIMATORS.register("name")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from visionleaf.registry import Registry

EntropyEstimator = Callable[[Sequence[float]], float]
"""Top-k logprobs (descending, natural log) -> entropy in nats."""

ENTROPY_ESTIMATORS: Registry[EntropyEstimator] = Registry("entropy estimator")


@ENTROPY_ESTIMATORS.register("min")
def min_entropy(top_logprobs: Sequence[float]) -> float:
    """Min-entropy ``-log max_x p(x)``: needs only the top-1 logprob."""
    return -max(top_logprobs)


@ENTROPY_ESTIMATORS.register("topk")
def topk_entropy(top_logprobs: Sequence[float]) -> float:
    """Shannon entropy over the top-k tokens plus the tail mass as one outcome (a lower bound)."""
    probs = [math.exp(lp) for lp in top_logprobs]
    tail = max(0.0, 1.0 - sum(probs))
    return -sum(p * lp for p, lp in zip(probs, top_logprobs, strict=True) if p > 0) - (
        tail * math.log(tail) if tail > 0 else 0.0
    )
