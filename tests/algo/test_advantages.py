import math

import pytest
import torch

from visionleaf.algo.advantages import grpo_advantages, tree_grpo_advantages


def test_grpo_by_hand():
    scores = torch.tensor([1.0, 0.0, 2.0, 5.0, 5.0])
    adv = grpo_advantages(scores, ["a", "a", "a", "b", "c"], eps=0.0)
    # group a: mean 1, std 1 (unbiased) -> 0, -1, 1; b alone -> 0; c alone -> 0
    assert adv.tolist() == pytest.approx([0.0, -1.0, 1.0, 0.0, 0.0])


def test_tree_grpo_hand_computed():
    # One prompt, tree:   0 (root)
    #                   /          \
    #                  1            2
    #                /   \          |
    #               3     4         5
    # leaves 3, 4 (split below node 1) and 5 (last branching point: the root).
    scores = torch.tensor([1.0, 0.0, 0.0])
    paths = [[0, 1, 3], [0, 1, 4], [0, 2, 5]]
    adv = tree_grpo_advantages(scores, ["u"] * 3, paths, subtree_weight=1.0, eps=0.0)
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # unbiased std = 0.5774
    grpo = [(1 - mean) / std, (0 - mean) / std, (0 - mean) / std]
    subtree = [(1 - 0.5) / std, (0 - 0.5) / std, 0.0]  # leaves 3 and 4 vs their mean under node 1
    assert adv.tolist() == pytest.approx([g + s for g, s in zip(grpo, subtree, strict=True)])


def test_tree_grpo_is_grpo_on_chains_and_with_zero_weight():
    scores = torch.tensor([0.3, 1.0, -0.2, 0.7, 2.0, 0.0])
    groups = ["a", "a", "a", "b", "b", "b"]
    chains = [[0, i + 1, i + 10] for i in range(6)]  # every leaf branches off at the root
    assert torch.allclose(tree_grpo_advantages(scores, groups, chains), grpo_advantages(scores, groups))
    tree = [[0, 1, 2], [0, 1, 3], [0, 4], [0, 1, 2], [0, 1, 3], [0, 5]]
    assert torch.allclose(
        tree_grpo_advantages(scores, groups, tree, subtree_weight=0.0), grpo_advantages(scores, groups)
    )
    assert not torch.allclose(tree_grpo_advantages(scores, groups, tree), grpo_advantages(scores, groups))


def test_equal_rewards_give_zero_advantage():
    adv = tree_grpo_advantages(torch.ones(4), ["g"] * 4, [[0, 1, 2], [0, 1, 3], [0, 4, 5], [0, 4, 6]])
    assert torch.equal(adv, torch.zeros(4))
