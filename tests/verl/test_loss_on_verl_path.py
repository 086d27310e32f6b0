"""visionleaf's policy loss through verl's own registry and config objects."""

import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from visionleaf.verl import algos


@pytest.fixture(scope="module")
def actor_config():
    algos.register()
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": None, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0})
    config.global_batch_info = {}
    return config


def batch(seed=0):
    torch.manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 1, 1, 1]])  # 0 = observation tokens
    return torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 1).expand(2, 8).clone(), mask


def test_registered_and_equal_to_verl_vanilla(actor_config):
    ours, vanilla = get_policy_loss_fn("visionleaf"), get_policy_loss_fn("vanilla")
    old, new, adv, mask = batch()
    loss, _ = ours(old, new, adv, mask, "token-mean", actor_config)
    reference, _ = vanilla(old, new, adv, mask, "token-mean", actor_config)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_observation_tokens_do_not_change_the_loss_on_verls_path(actor_config):
    loss_fn = get_policy_loss_fn("visionleaf")
    old, new, adv, mask = batch(1)
    loss, _ = loss_fn(old, new, adv, mask, "token-mean", actor_config)
    obs = mask == 0
    old2, new2, adv2 = old.clone(), new.clone(), adv.clone()
    old2[obs], new2[obs], adv2[obs] = -30.0, 30.0, -1e4  # anything at all on the crop tokens
    loss2, _ = loss_fn(old2, new2, adv2, mask, "token-mean", actor_config)
    assert loss2.item() == pytest.approx(loss.item())


def test_global_token_count_across_ranks(actor_config):
    loss_fn = get_policy_loss_fn("visionleaf")
    old, new, adv, mask = batch(2)
    local, _ = loss_fn(old, new, adv, mask, "token-mean", actor_config)
    config = actor_config.copy()
    config.global_batch_info = {"dp_size": 2, "batch_num_tokens": 2 * int(mask.sum())}
    scaled, _ = loss_fn(old, new, adv, mask, "token-mean", config)
    assert scaled.item() == pytest.approx(local.item())  # twice the tokens, times dp 2: the same local loss


def test_other_aggregation_is_refused(actor_config):
    with pytest.raises(ValueError, match="loss_agg_mode=token-mean"):
        get_policy_loss_fn("visionleaf")(*batch(), "seq-mean-token-sum", actor_config)
