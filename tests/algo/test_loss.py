import pytest
import torch

from visionleaf.algo.loss import clipped_policy_loss


def test_observation_tokens_change_nothing():
    torch.manual_seed(0)
    log_prob, old = torch.randn(2, 6), torch.randn(2, 6)
    adv = torch.randn(2, 1).expand(2, 6).clone()
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1]])
    loss, _ = clipped_policy_loss(log_prob, old, adv, mask)
    # Change everything on observation tokens: log-probs, old log-probs and advantages.
    obs = mask == 0
    log_prob2, old2, adv2 = log_prob.clone(), old.clone(), adv.clone()
    log_prob2[obs], old2[obs], adv2[obs] = 50.0, -50.0, 1e6
    loss2, _ = clipped_policy_loss(log_prob2, old2, adv2, mask)
    assert loss2.item() == pytest.approx(loss.item())


def test_token_mean_over_model_tokens_by_hand():
    # ratio 1 everywhere: loss = -mean(advantage) over the 3 model tokens
    zeros = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 2.0, 100.0, 3.0]])
    loss, metrics = clipped_policy_loss(zeros, zeros, adv, torch.tensor([[1, 1, 0, 1]]))
    assert loss.item() == pytest.approx(-(1 + 2 + 3) / 3)
    assert metrics["actor/loss_tokens"] == 3


def test_clipping_and_dual_clip():
    adv_pos, adv_neg = torch.tensor([[1.0]]), torch.tensor([[-1.0]])
    mask = torch.ones(1, 1)
    up = torch.log(torch.tensor([[2.0]]))  # ratio 2
    loss, metrics = clipped_policy_loss(up, torch.zeros(1, 1), adv_pos, mask)
    assert loss.item() == pytest.approx(-1.2)  # clipped at 1 + 0.2
    assert metrics["actor/pg_clipfrac"] == 1.0
    big = torch.log(torch.tensor([[10.0]]))  # ratio 10 with a negative advantage: dual clip at 3
    loss, _ = clipped_policy_loss(big, torch.zeros(1, 1), adv_neg, mask)
    assert loss.item() == pytest.approx(3.0)


def test_gradient_flows_only_through_model_tokens():
    log_prob = torch.zeros(1, 4, requires_grad=True)
    loss, _ = clipped_policy_loss(log_prob, torch.zeros(1, 4), torch.ones(1, 4), torch.tensor([[1, 0, 1, 0]]))
    loss.backward()
    assert log_prob.grad is not None
    assert log_prob.grad[0, 1] == 0 and log_prob.grad[0, 3] == 0 and log_prob.grad[0, 0] != 0
