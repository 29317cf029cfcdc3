"""The NNX example model sharded: inferred shardings and user rules, on 8 CPU devices.

  python examples/nnx_sharded.py            # forces 8 host devices; prints the three runs' losses

Trains examples/nnx_lora.py's ByteLM with QLoRA for a few steps three times: on one device, on
8 devices with jaxft's inferred shardings (every Variable's largest dim that `fsdp` divides is
split over it; NF4 codes and scales follow their kernel), and on a 4 x 2 `fsdp` x `tensor` mesh
with user rules (regex over Variable paths -> PartitionSpec). The losses agree to float32
rounding; it prints where a few leaves were placed.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nnx_lora  # noqa: E402

import jaxft.nnx  # noqa: E402

RULES = [(r"/(q|v|up)/(kernel|lora_a)$", P("fsdp", "tensor")),
         (r"/down/kernel$", P("tensor", "fsdp"))]


def run(mesh, rules=(), steps=4):
  """(losses, trainer) of QLoRA on a fresh one-block ByteLM on `mesh`."""
  base = nnx_lora.ByteLM(64, 1, heads=4, rngs=nnx.Rngs(0))
  model = jaxft.nnx.lora(base, "q,v,up,down", rank=4, quant_kind="nf4")
  trainer = jaxft.nnx.Trainer(model, nnx_lora.loss_fn, optax.adamw(3e-3), mesh=mesh, rules=rules)
  batch = nnx_lora.batch_of(nnx_lora.ROWS)
  return [trainer.step(batch)["loss"] for _ in range(steps)], trainer


def main():
  devices = np.asarray(jax.devices())
  one, _ = run(Mesh(devices[:1], ("fsdp",)))
  inferred, trainer = run(Mesh(devices, ("fsdp",)))
  ruled, ruled_trainer = run(Mesh(devices.reshape(4, 2), ("fsdp", "tensor")), RULES)
  for name, losses in (("1 device", one), ("fsdp=8, inferred", inferred),
                       ("fsdp=4 x tensor=2, rules", ruled)):
    print(f"{name:26s}", " ".join(f"{x:.6f}" for x in losses))
  for t in (trainer, ruled_trainer):
    up = t.frozen["blocks"][0]["up"]["kernel"].get_value()
    a = t.state["trainable"]["blocks"][0]["up"]["lora_a"].get_value()
    print(f"mesh {dict(t.mesh.shape)}: up NF4 codes {up.codes.shape} {up.codes.sharding.spec}, "
          f"up lora_a {a.shape} {a.sharding.spec}")
  np.testing.assert_allclose(inferred, one, rtol=1e-5)
  np.testing.assert_allclose(ruled, one, rtol=1e-5)


if __name__ == "__main__":
  main()
