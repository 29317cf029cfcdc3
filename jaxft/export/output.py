"""Where an export goes: refusing an --out that would destroy checkpoints or the base, and writing
into a temporary directory beside OUT that is renamed at the end, so OUT is absent or complete."""

from __future__ import annotations

import os
import shutil

import jax
from absl import logging

from jaxft import files, session
from jaxft.errors import ConfigError
from jaxft.models import llama


def _is_workdir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(
      os.path.join(path, "jaxft.lock"))


def _inside(a: str, b: str) -> bool:
  """a is b or lies inside b (real paths)."""
  return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_out(out: str, overwrite: bool, workdir: str, config=None) -> None:
  """Refuses an OUT that exists (unless --overwrite), and always one that is, contains or lies
  inside the workdir, another jaxft workdir or the model and tokenizer directories in use:
  replacing it would destroy checkpoints or the base. Also clears OUT.tmp-PID leftovers of a
  killed export."""
  if not out:
    raise ConfigError("--out is empty")
  real = os.path.realpath(out)
  used = {"--workdir": workdir}
  if config is not None:
    used["model.path"] = config.model.path
    used["model.tokenizer"] = config.model.tokenizer
  for what, path in used.items():
    if not path:
      continue
    p = os.path.realpath(path)
    if what == "model.path" and os.path.isfile(p):
      p = os.path.dirname(p)
    if _inside(real, p) or _inside(p, real):
      raise ConfigError(f"--out={out}: {'is' if real == p else 'overlaps'} the {what} directory "
                        f"in use ({path}); exporting there would destroy it. Choose a directory "
                        "outside it")
  probe = real
  while probe != os.path.dirname(probe):
    if _is_workdir(probe):
      raise ConfigError(f"--out={out}: lies inside the jaxft workdir {probe}; choose a "
                        "directory outside it")
    probe = os.path.dirname(probe)
  if os.path.isdir(real):
    # The whole tree: --overwrite replaces all of it, and a run kept any number of levels down
    # (OUT/a/b/run) is lost as surely as one at the top. Links are not followed (removing OUT
    # removes a link, not what it points to).
    for d, _, _ in os.walk(real):
      if _is_workdir(d):
        raise ConfigError(f"--out={out}: contains the jaxft workdir {d}; choose another "
                          "directory")
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)) and not overwrite:
    raise ConfigError(f"--out={out}: already exists; choose another directory or pass --overwrite")
  for stale in files.remove_stale(os.path.abspath(out)):
    logging.warning("removed %s, left by an export that did not finish", stale)


def merged_params(trained: session.Trained) -> dict:
  """The base with the method folded in; the tree must then be exactly the decoder's."""
  cfg, method = trained.model.cfg, trained.model.method
  merged = method.merge(cfg, trained.params)
  want = {"/".join(k.key for k in kp) for kp, _ in
          jax.tree_util.tree_flatten_with_path(llama.param_specs(cfg), is_leaf=llama.is_spec)[0]}
  have = {"/".join(k.key for k in kp) for kp, _ in
          jax.tree_util.tree_flatten_with_path(merged, is_leaf=_is_param)[0]}
  if have != want:
    extra = sorted(have - want) or sorted(want - have)
    raise ConfigError(f"peft.method={method.name}: merging left {extra[:3]} that an HF "
                      "checkpoint cannot hold; export with --format=peft instead")
  return merged


def _is_param(x) -> bool:
  return hasattr(x, "dequantize") or isinstance(x, jax.Array)


def write_atomically(out: str, write) -> None:
  """Runs write(tmp_dir) on every process, tmp_dir a temporary directory on process 0 and "" on
  the others, then renames it to OUT; on any failure the temporary directory is removed, so OUT is
  never half-written."""
  main = jax.process_index() == 0
  tmp = files.temp_dir(out) if main else ""
  try:
    write(tmp)
  except BaseException:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  if main:
    files.publish_dir(tmp, out)
