"""Reinforcement learning from rewards, the pure parts: GRPO's advantages and loss (loss.py) and
the reward functions that score completions (rewards.py).

  loss.py     group-relative advantages; the clipped policy loss with TRL 1.16's normalisations
              (grpo, bnpo, dr_grpo, dapo) and optional KL to a reference, split for accumulation
  rewards.py  built-in rewards (match, format, abstain, length), a user's `module:function`, and
              `score`, which runs and checks them
"""

from jaxft.rl.loss import LOSS_TYPES, PolicyLoss, group_advantages, grpo_loss, per_token_loss

__all__ = ["LOSS_TYPES", "PolicyLoss", "group_advantages", "grpo_loss", "per_token_loss"]
