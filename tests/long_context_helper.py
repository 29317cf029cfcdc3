"""Context parallelism on 8 forced CPU devices, run by tests/test_long_context.py in a process of
its own (XLA_FLAGS must be set before JAX is imported; ordinary tests keep one device).

  python tests/long_context_helper.py [--mixed]   -> one JSON object on the last line of stdout

--mixed adds LoRA on tensor=2 x context=4 (measured equal too; left out of the suite for time).

Trains a tiny model (2 layers, hidden 64, vocabulary 512) on one packed row of 8,192 tokens for a few steps, on one
device and with the row split over chips (mesh.context), with LoRA and with full fine-tuning.
"""

import os
import sys

if __name__ == "__main__":
  # (LLVM's full optimisation: these programs spend their time running, not compiling; at level 0
  # a step on 8,192 tokens ran 2x slower)
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                             "--xla_llvm_disable_expensive_passes=true")
  os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from jaxft.data import pipeline  # noqa: E402
from jaxft.data.formats import Example  # noqa: E402
from jaxft.models import config as mc  # noqa: E402
from multidevice_helper import base_config, losses_on  # noqa: E402

ROW = 8192
STEPS = 2
# (data, fsdp, tensor, context): one device, the row over 8 chips, and context beside the others.
MESHES = {"1": (1, 1, 1, 1), "context=8": (1, 1, 1, 8), "tensor=2,context=4": (1, 1, 2, 4)}


# The tiny preset's shape (2 layers, hidden 64, 2 key/value heads: tensor=2 divides them) with a
# 512-token vocabulary and 2 heads of 8: attention on 8,192 tokens costs a quarter of the tiny
# preset's, which keeps the one-device reference run cheap.
mc.PRESETS["tiny-long"] = mc.PRESETS["tiny"].replace(vocab_size=512, num_heads=2, head_dim=8)


def long_batches(rows: int, n: int = STEPS):
  """n batches of `rows` packed rows of ROW tokens: three long examples each (positions restart
  at each, a prompt that is not a target) and padding at the end."""
  rng = np.random.default_rng(0)
  examples = []
  for _ in range(n * rows):
    for k in (ROW * 3 // 8, ROW * 5 // 16, ROW * 9 // 32):
      mask = np.ones(k, bool)
      mask[: k // 5] = False
      examples.append(Example(rng.integers(3, 512, k).astype(np.int32), mask))
  stream = pipeline.TrainStream(examples, max_len=ROW, packing=True, rows_per_batch=rows, seed=0,
                                shuffle=False)
  pos, out = pipeline.Position(), []
  for _ in range(n):
    b, pos = stream.batch_at(pos)
    out.append(b)
  return out


def main():
  logging.set_verbosity(logging.WARNING)
  assert jax.device_count() == 8, jax.devices()
  out = {}
  for method in ("lora", "full"):
    for name, (d, f, t, ctx) in MESHES.items():
      if name.startswith("tensor") and (method == "full" or "--mixed" not in sys.argv):
        continue  # (LoRA covers the mixed mesh; full fine-tuning the plain context split)
      start = time.time()
      c = base_config(method, (d, f, t), preset="tiny-long")
      c.mesh.context = ctx
      c.data.max_len = ROW
      c.data.batch_size = d * f
      c.train.steps = STEPS
      devices = jax.devices()[:1] if name == "1" else jax.devices()[: d * f * t * ctx]
      batches = long_batches(c.data.batch_size)
      out[f"{method}:{name}"] = losses_on(c, devices, batches)
      print(f"long_context_helper: {method} {name} took {time.time() - start:.1f}s",
            file=sys.stderr)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
