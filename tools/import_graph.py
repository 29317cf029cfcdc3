"""Reads the jaxft package with `ast` and reports what would let its shape decay.

  python tools/import_graph.py [--root=DIR] [--max_lines=80]

Prints (1) every import cycle between jaxft modules, counting imports made inside functions too
(they hide a cycle, they do not remove it) and the parent package whose `__init__` an import runs;
(2) every `jaxft` import made inside a function rather than at the top of its module, except in
the `_main` of an entry point (a module with `if __name__ == "__main__"`), which imports the
library only after the command has re-executed itself (jaxft.cli.run: huge-page malloc) and so
does not import jax twice; (3) every function longer than `--max_lines` lines; (4) every
folder-level loop: folder A imports something in folder B and B something in A, directly or
through other folders. A folder is a package directory (its `__init__` and modules, e.g.
jaxft/models/); a module that sits flat in jaxft/ (errors.py, session.py, evaluate.py), and a
package's `__main__` (an entry point), counts as a folder of its own, not as part of one `jaxft` root folder, since the flat leaves that every folder
imports (errors, files) would otherwise tie all folders into one loop. Exits 1 if it found any,
0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys


def module_names(root: str, package: str = "jaxft") -> dict[str, str]:
  """Maps each dotted module name under `root/package` to its file."""
  out = {}
  base = os.path.join(root, package)
  for dirpath, dirnames, filenames in os.walk(base):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
      if rel[-1] == "__init__":
        rel = rel[:-1]
      out[".".join(rel)] = os.path.join(dirpath, name)
  return out


def _targets(node: ast.AST, modules: dict[str, str], current: str) -> list[str]:
  """The jaxft modules an import statement runs: the named ones and their packages' __init__."""
  names = []
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    if node.level:
      pkg = current.split(".")
      if os.path.basename(modules[current]) != "__init__.py":
        pkg = pkg[:-1]
      pkg = pkg[: len(pkg) - node.level + 1]
      base = ".".join(pkg + ([node.module] if node.module else []))
    else:
      base = node.module or ""
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
  out = []
  for name in names:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    parts = name.split(".")
    # Importing a.b.c runs a.b's __init__ first (unless a.b is a package of `current`).
    for i in range(2, len(parts) + 1):
      dotted = ".".join(parts[:i])
      if dotted in modules and not (current + ".").startswith(dotted + "."):
        out.append(dotted)
  return [t for t in dict.fromkeys(out) if t != current]


def read(root: str):
  """Returns (graph {module: {imported module: first line}}, inner imports, long functions)."""
  modules = module_names(root)
  graph, inner, long_fns = {}, [], []
  for mod, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
    graph[mod] = {}
    entry = any(isinstance(n, ast.If) and "__main__" in ast.dump(n.test) for n in tree.body)
    parents = {}
    for parent in ast.walk(tree):
      for child in ast.iter_child_nodes(parent):
        parents[child] = parent
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        targets = _targets(node, modules, mod)
        for t in targets:
          graph[mod].setdefault(t, node.lineno)
        up = parents.get(node)
        while up is not None and not isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef)):
          up = parents.get(up)
        if targets and up is not None and not (entry and up.name == "_main"
                                                 and up in tree.body):
          inner.append((path, node.lineno, up.name, ", ".join(targets)))
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        long_fns.append((path, node.lineno, node.name, n))
  return graph, inner, long_fns


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan), each sorted."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, {}):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def folder(module: str, modules: dict[str, str], package: str = "jaxft") -> str:
  """The folder `module` belongs to: its package (itself for an `__init__`), or the module itself
  when it sits flat in the top package or is a package's `__main__` (`python -m jaxft.data`: an
  entry point, which nothing imports, like the flat jaxft/train.py; a command over a leaf folder
  may need what imports that folder)."""
  if os.path.basename(modules[module]) == "__init__.py":
    return module
  parent = module.rpartition(".")[0]
  return module if parent == package or module.endswith(".__main__") else parent


def folder_loops(graph: dict[str, dict[str, int]], modules: dict[str, str]):
  """Loops between folders: [(sorted folders, {(folder, imported folder): [(module, imported
  module, line), ...]})], listing the imports that cross between two folders of the loop (the
  direction with fewer of them is usually the one to undo)."""
  fgraph: dict[str, dict[str, int]] = {}
  crossing: dict[tuple[str, str], list] = {}
  for a, targets in graph.items():
    fa = folder(a, modules)
    fgraph.setdefault(fa, {})
    for b, line in targets.items():
      fb = folder(b, modules)
      if fa != fb:
        fgraph[fa].setdefault(fb, line)
        crossing.setdefault((fa, fb), []).append((a, b, line))
  out = []
  for comp in cycles(fgraph):
    out.append((comp, {(fa, fb): sorted(crossing[(fa, fb)]) for fa in comp for fb in comp
                       if (fa, fb) in crossing}))
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  ap.add_argument("--max_lines", type=int, default=80)
  args = ap.parse_args(argv)
  graph, inner, fns = read(args.root)
  modules = module_names(args.root)
  found = cycles(graph)
  loops = folder_loops(graph, modules)
  long_fns = [f for f in fns if f[3] > args.max_lines]
  rel = lambda p: os.path.relpath(p, args.root)
  for comp in found:
    edges = [f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in graph[a] if b in comp]
    print(f"cycle: {' <-> '.join(comp)}\n  " + "\n  ".join(edges))
  for comp, pairs in loops:
    print(f"folder loop: {' <-> '.join(comp)}")
    for (fa, fb), edges in pairs.items():
      shown = ", ".join(f"{rel(modules[a])}:{line} imports {b}" for a, b, line in edges[:3])
      more = f" and {len(edges) - 3} more" if len(edges) > 3 else ""
      print(f"  {fa} -> {fb}: {len(edges)} imports: {shown}{more}")
  for path, line, fn, targets in inner:
    print(f"import inside a function: {rel(path)}:{line} in {fn}(): {targets}")
  for path, line, fn, n in sorted(long_fns, key=lambda f: -f[3]):
    print(f"long function: {rel(path)}:{line} {fn}() is {n} lines (limit {args.max_lines})")
  folders = {folder(m, modules) for m in graph}
  print(f"{len(graph)} modules in {len(folders)} folders, {sum(map(len, graph.values()))} imports: "
        f"{len(found)} cycles, {len(loops)} folder loops, {len(inner)} imports inside functions, "
        f"{len(long_fns)} functions over {args.max_lines} lines")
  return 1 if found or loops or inner or long_fns else 0


if __name__ == "__main__":
  sys.exit(main())
