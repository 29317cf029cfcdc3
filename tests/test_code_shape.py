"""The package's shape (tools/import_graph.py): no import cycles between modules nor loops between
folders, jaxft imports at the tops of modules, no function over 80 lines; and the check itself
finds each of those when present."""

import importlib.util
import os
import textwrap

from conftest import ROOT


def _tool():
  spec = importlib.util.spec_from_file_location(
      "import_graph", os.path.join(ROOT, "tools", "import_graph.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_jaxft_has_no_cycles_folder_loops_inner_imports_or_long_functions(capsys):
  assert _tool().main([f"--root={ROOT}"]) == 0, capsys.readouterr().out
  assert " 0 folder loops," in capsys.readouterr().out


def _package(tmp_path, files: dict[str, str]) -> str:
  for name, text in files.items():
    path = tmp_path / "jaxft" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
  return str(tmp_path)


def test_the_check_finds_a_hidden_cycle_an_inner_import_and_a_long_function(tmp_path, capsys):
  long_body = "".join(f"  x{i} = {i}\n" for i in range(85))
  root = _package(tmp_path, {
      "__init__.py": "",
      "a.py": "from jaxft import b\n",
      # the cycle a -> b -> a hides behind an import inside a function
      "b.py": "def f():\n  from jaxft import a\n  return a\n",
      "sub/__init__.py": "from jaxft.sub import c\n",
      "sub/c.py": "def g():\n" + long_body,
      # importing jaxft.sub.c runs jaxft/sub/__init__.py: an edge to the package too
      "d.py": "from jaxft.sub.c import g\n",
      "train.py": ("def _main():\n  from jaxft import a\n\n\n"
                   "if __name__ == '__main__':\n  _main()\n"),
  })
  tool = _tool()
  assert tool.main([f"--root={root}"]) == 1
  out = capsys.readouterr().out
  assert "cycle: jaxft.a <-> jaxft.b" in out
  assert "jaxft/b.py:2 in f(): jaxft.a" in out
  assert "jaxft/sub/c.py:1 g() is 86 lines" in out
  assert "train.py" not in out  # an entry point's _main may import after its re-exec
  graph, _, _ = tool.read(root)
  assert set(graph["jaxft.d"]) == {"jaxft.sub", "jaxft.sub.c"}


def test_the_check_finds_a_loop_between_folders_with_no_module_cycle(tmp_path, capsys):
  root = _package(tmp_path, {
      "__init__.py": "",
      "errors.py": "",
      # p.x -> q.y and q.z -> p.w: no module imports itself back, but the folders do
      "p/__init__.py": "",
      "p/x.py": "from jaxft.q import y\n",
      "p/w.py": "from jaxft import errors\n",
      "q/__init__.py": "from jaxft.errors import *\n",
      "q/y.py": "",
      "q/z.py": "from jaxft.p import w\n",
      # flat modules are folders of their own: a leaf every folder imports ties none together
      "main.py": "from jaxft.p import x\n",
  })
  tool = _tool()
  assert tool.main([f"--root={root}"]) == 1
  out = capsys.readouterr().out
  assert "folder loop: jaxft.p <-> jaxft.q\n" in out
  # (importing jaxft.q.y runs jaxft/q/__init__.py too: two imports of the folder)
  assert "jaxft.p -> jaxft.q: 2 imports: jaxft/p/x.py:1 imports jaxft.q, jaxft/p/x.py:1 imports " \
         "jaxft.q.y" in out
  assert "jaxft.q -> jaxft.p: 2 imports: jaxft/q/z.py:1 imports jaxft.p, " in out
  assert "0 cycles, 1 folder loops" in out and "errors" not in out and "main" not in out
  (tmp_path / "jaxft" / "q" / "z.py").write_text("")
  assert tool.main([f"--root={root}"]) == 0
