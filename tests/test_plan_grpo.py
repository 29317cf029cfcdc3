"""jaxft.plan for train.objective=grpo: the rollouts' programs (decode's prefill and loop, with their
KV cache) compiled and measured beside the train step, on the local CPU with the tiny model."""

import jax.numpy as jnp
import pytest

from conftest import tiny_config
from jaxft import objectives, plan as plan_lib, session
from jaxft.data import bundled
from jaxft.plan import phases


def grpo_config(**over):
  base = {"train.objective": "grpo", "data.train": bundled.path("capital_prompts_train.jsonl"),
          "data.eval": "", "data.max_len": 64, "data.batch_size": 4, "rl.generations": 4,
          "rl.max_completion_tokens": 40}
  return tiny_config(**dict(base, **over))


@pytest.fixture(scope="module")
def planned():
  config = grpo_config()
  return config, plan_lib.plan(config, "local", time=False)


def test_the_plan_measures_the_rollouts_beside_the_step_and_takes_the_peak(planned):
  config, r = planned
  (rollout,) = r["phases"]
  assert rollout["name"] == "rollout" and set(rollout["programs"]) == {"prefill", "decode"}
  cfg = session.model_config(config)
  # 4 completions; the longest prompt 64 - 40 = 24 tokens padded to 32 slots, + 40 completion
  B, S = 4, 32 + 40
  kv = 2 * cfg.num_layers * B * S * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
  assert rollout["figures_gib"]["kv_cache"] * 2**30 == pytest.approx(kv + B * S * 4)  # + seg ids
  assert "4 completions x 72 cache slots (prompt 32 + completion 40)" in rollout["describe"]
  prefill, loop = rollout["programs"]["prefill"], rollout["programs"]["decode"]
  assert prefill["gib"] >= rollout["figures_gib"]["kv_cache"]  # the cache is its output
  assert loop["arguments_gib"] >= rollout["figures_gib"]["kv_cache"]  # and the loop's input
  assert rollout["total_gib"] == pytest.approx(
      max(prefill["gib"], loop["gib"]) + r["gib"]["optimizer_state"])
  assert r["total_gib"] == max(r["step_total_gib"], rollout["total_gib"])
  assert r["fits"] is True and rollout["fits"] is True and r["step_fits"] is True
  text = plan_lib.format_report(r)
  for words in ("step total", "rollout: the rollouts before each step", "prefill", "decode",
                "kv cache", "never at once", "peak per chip"):
    assert words in text, text


def test_the_run_fits_only_when_the_step_and_every_phase_fit():
  r = {"total_gib": 10.0, "fits": True, "chip_gib": 16.0}
  phase = {"name": "rollout", "total_gib": 20.0}
  out = phases.combine(r, [phase])
  assert out["fits"] is False and out["step_fits"] is True and out["total_gib"] == 20.0
  refused = phases.combine(r, [{"name": "rollout", "total_gib": None}])
  assert refused["fits"] is False and refused["total_gib"] == 10.0


def test_an_objective_on_fixed_data_adds_nothing_to_the_plan():
  sft = objectives.from_config(tiny_config(), trains_base=False)
  assert sft.plan_phases(tiny_config(), None, None, {}, {}, None) == []
