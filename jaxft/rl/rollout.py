"""From sampled completions to the rows GRPO trains on, and what a step logs of its rollouts.

A train row is one completion: its prompt's tokens then the completion's (with the end token when
it stopped at one, as TRL's completion mask keeps it), in jaxft's token layout (inputs, targets,
weights, positions, segment_ids [N, T]); `weights` is the completion mask, the loss's. A prompt's
`generations` completions are adjacent rows.
"""

from __future__ import annotations

import numpy as np


def sampling_seed(seed: int, step: int) -> int:
  """The decoder's seed for the rollouts made after `step` optimizer steps: a function of
  (train.seed, step) alone, so a resumed run samples the tokens an uninterrupted one did."""
  return int(np.random.SeedSequence([int(seed), int(step)]).generate_state(1)[0] >> 1)


def completion_ids(gen) -> np.ndarray:
  """A Generation's trained tokens: its tokens, then the end token it stopped at, if any."""
  ids = np.asarray(gen.tokens, np.int32)
  if gen.end_token is not None:
    ids = np.append(ids, np.int32(gen.end_token))
  return ids


def build_rows(prompt_ids: list[np.ndarray], completions: list[np.ndarray],
               advantages: np.ndarray, max_len: int, fields: dict) -> dict:
  """The train batch [N, max_len] of N (prompt, completion) pairs: `fields` ({name: dtype}, the
  objective's token fields; those not set here are zeros), with "advantages" [N, T]
  (each completion's advantage on every position; the mask picks its tokens). A completion cut
  to fit max_len loses its last tokens (load_prompts leaves room for rl.max_completion_tokens)."""
  n = len(completions)
  b = {k: np.zeros((n, max_len), dtype) for k, dtype in fields.items()}
  for r, (p, c) in enumerate(zip(prompt_ids, completions)):
    ids = np.concatenate([p, c])[:max_len + 1]
    t = len(ids) - 1
    b["inputs"][r, :t] = ids[:-1]
    b["targets"][r, :t] = ids[1:]
    b["weights"][r, len(p) - 1:t] = 1.0  # the targets that are completion tokens
    b["positions"][r, :t] = np.arange(t)
    b["segment_ids"][r, :t] = 1
  b["advantages"] = np.repeat(np.asarray(advantages, np.float32)[:, None], max_len, axis=1)
  return b


def rollout_metrics(completions: list[np.ndarray], finishes: list[str], advantages: np.ndarray,
                    total: np.ndarray, generations: int) -> dict:
  """What TRL logs of a batch of rollouts besides the rewards: completion lengths (in trained
  tokens), the share cut at rl.max_completion_tokens, the advantages' spread and the share of
  groups whose rewards were all equal (no signal: zero advantages)."""
  lengths = np.asarray([len(c) for c in completions], np.float64)
  groups = np.asarray(total, np.float64).reshape(-1, generations)
  adv = np.asarray(advantages, np.float64)
  return {"completions/mean_length": float(lengths.mean()),
          "completions/max_length": float(lengths.max()),
          "completions/min_length": float(lengths.min()),
          "completions/clipped_ratio": float(np.mean([f != "eos" for f in finishes])),
          "advantages/std": float(adv.std(ddof=1)) if adv.size > 1 else 0.0,
          "advantages/min": float(adv.min()), "advantages/max": float(adv.max()),
          "frac_reward_zero_std": float(np.mean(np.ptp(groups, axis=1) == 0))}
