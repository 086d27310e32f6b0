"""Rewards: answer accuracy, format penalty, gated tool bonus and LFPC grounding (SPEC §4).

The ``accuracy`` function is not re-exported here: it would shadow the ``accuracy`` submodule.
"""

from visionleaf.reward.accuracy import (
    MATCHER_REGISTRY,
    MAX_ANSWER_CHARS,
    get_matcher,
    normalize_text,
    register_matcher,
)
from visionleaf.reward.grounding import grounding_reward
from visionleaf.reward.judge import JudgeConfig, JudgeError, JudgeUnavailableError, LLMJudge, get_judge
from visionleaf.reward.score import ResponseSummary, RewardConfig, compute_score, format_problems, summarize_response

__all__ = [
    "MATCHER_REGISTRY",
    "MAX_ANSWER_CHARS",
    "JudgeConfig",
    "JudgeError",
    "JudgeUnavailableError",
    "LLMJudge",
    "ResponseSummary",
    "RewardConfig",
    "compute_score",
    "format_problems",
    "get_judge",
    "get_matcher",
    "grounding_reward",
    "normalize_text",
    "register_matcher",
    "summarize_response",
]
