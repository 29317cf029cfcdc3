"""Reinforcement learning from rewards, the pure parts: GRPO's advantages and loss (loss.py) and
the rewards that score completions (rewards.py, scoring.py).

  loss.py     group-relative advantages; the clipped policy loss with TRL 1.16's normalisations
              (grpo, bnpo, dr_grpo, dapo) and optional KL to a reference, split for accumulation
  rewards.py  the built-in reward functions (match, format, abstain, length), TRL's convention
  scoring.py  rl.rewards specs -> functions (built-ins with arguments, a user's module:function),
              and `score`, which runs them, checks what they return and adds them up by weight
  prompts.py  GRPO's prompt rows (file:line errors) and the resumable stream of prompt groups
  rollout.py  sampled completions -> train rows (completion mask, advantages); rollout metrics
              and the sampling seed of a step (jaxft/objectives/grpo.py runs the rollouts)
"""

from jaxft.rl.loss import LOSS_TYPES, PolicyLoss, group_advantages, grpo_loss, per_token_loss
from jaxft.rl.rewards import (ABSTAIN_PATTERNS, abstain_reward, format_reward, length_reward,
                              match_reward)
from jaxft.rl.scoring import BUILTINS, Reward, parse_weights, resolve, reward_metrics, score

__all__ = ["LOSS_TYPES", "PolicyLoss", "group_advantages", "grpo_loss", "per_token_loss",
           "ABSTAIN_PATTERNS", "abstain_reward", "format_reward", "length_reward", "match_reward",
           "BUILTINS", "Reward", "parse_weights", "resolve", "reward_metrics", "score"]
