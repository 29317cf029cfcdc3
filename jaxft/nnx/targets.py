"""Which `nnx.Linear` layers of a user's module a `targets` string selects.

The grammar is `peft.targets`' (jaxft.peft.match_targets): comma-separated items, each a layer
name (the last part of its path: `q` selects every `.../q`), `all-linear`, or a regex searched in
the kernel's path, e.g. `layers/\\d+/attn/(q|v)/kernel`. Paths join attribute names and list
indices with `/`, as `nnx.iter_modules` walks the module.
"""

from __future__ import annotations

import re

from flax import nnx

from jaxft.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def path_str(path) -> str:
  """('layers', 0, 'attn', 'q') -> 'layers/0/attn/q'."""
  return "/".join(str(p) for p in path)


def linears(model: nnx.Module, kind=nnx.Linear) -> dict[str, tuple]:
  """{'layers/0/attn/q': path tuple} of every `kind` module inside `model`, in module order.

  Only layers of exactly `kind`: a subclass may compute something other than x @ kernel + bias."""
  return {path_str(p): tuple(p) for p, m in nnx.iter_modules(model) if type(m) is kind and p}


def match(targets: str, paths, key: str = "targets") -> list[str]:
  """The paths (strings, as from `linears`) that `targets` selects, in the given order.

  Raises ConfigError naming `key` when `targets` is empty or an item matches no path."""
  paths = list(paths)
  items = [t.strip() for t in (targets or "").split(",") if t.strip()]
  if not items:
    raise ConfigError(f"{key} is empty: name linear layers (q,v), all-linear or a regex over "
                      f"kernel paths such as {_example(paths)!r}")
  chosen = set()
  for item in items:
    if item == "all-linear":
      hits = set(paths)
    elif _NAME.match(item):
      hits = {p for p in paths if p.rsplit("/", 1)[-1] == item}
    else:
      try:
        rx = re.compile(item)
      except re.error as e:
        raise ConfigError(f"{key} item {item!r} is not a valid regex: {e}") from None
      hits = {p for p in paths if rx.search(p + "/kernel")}
    if not hits:
      names = sorted({p.rsplit("/", 1)[-1] for p in paths})
      raise ConfigError(f"{key} item {item!r} matches no nnx.Linear layer; expected a layer name "
                        f"({', '.join(names) or 'the model has none'}), all-linear or a regex "
                        f"over kernel paths such as {_example(paths)!r}")
    chosen |= hits
  return [p for p in paths if p in chosen]


def _example(paths) -> str:
  return (paths[0] if paths else "layers/0/attn/q") + "/kernel"
