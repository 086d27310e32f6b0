"""Advantages over the N leaves of each prompt: GRPO, and the tree-aware ``tree_grpo``.

``tree_grpo`` adds a subtree-relative term: a leaf is also compared with the leaves that share its
last branching point, so the decision taken after that split gets credit separately from the prefix
all of them share (VisionLeaf §3.1's variance argument, made explicit)::

    A_i = (r_i - mean_g) / (std_g + eps) + w * (r_i - mean_{s(i)}) / (std_g + eps)

where g is the prompt's group and s(i) is the deepest non-root node on leaf i's path below which at
least two leaves of the group end. A leaf whose last branching point is the root gets no extra term
(GRPO already compares it with the whole group), so on chains ``tree_grpo`` is GRPO.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch


def grpo_advantages(
    scores: torch.Tensor, groups: Sequence[Hashable], eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """(r - group mean) / (group std + eps) per leaf; [B] -> [B]. A group of one gets 0.
    ``scale_by_std=False``: no division (Dr. GRPO; verl's ``norm_adv_by_std_in_grpo=False``)."""
    out = torch.zeros_like(scores)
    for rows in _rows_by_key(groups).values():
        group = scores[rows]
        if len(rows) > 1:
            out[rows] = (group - group.mean()) / (group.std() + eps if scale_by_std else 1.0)
    return out


def tree_grpo_advantages(
    scores: torch.Tensor,
    groups: Sequence[Hashable],
    node_paths: Sequence[Sequence[int]],
    subtree_weight: float = 1.0,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """GRPO plus ``subtree_weight`` x the subtree-relative term (module docstring); [B] -> [B].
    ``scale_by_std=False`` divides neither term by the group's std (as in :func:`grpo_advantages`)."""
    out = grpo_advantages(scores, groups, eps, scale_by_std)
    for rows in _rows_by_key(groups).values():
        if len(rows) < 2:
            continue
        std = scores[rows].std() + eps if scale_by_std else 1.0
        leaves_under: dict[int, list[int]] = defaultdict(list)  # node id -> rows of leaves below it
        for row in rows:
            for node in node_paths[row][:-1]:
                leaves_under[node].append(row)
        for row in rows:
            inner = node_paths[row][1:-1]  # ancestors below the root
            split = next((n for n in reversed(inner) if len(leaves_under[n]) > 1), None)
            if split is not None:
                subtree = scores[leaves_under[split]]
                out[row] += subtree_weight * (scores[row] - subtree.mean()) / std
    return out


def _rows_by_key(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    rows: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        rows[key].append(i)
    return rows
