#!/usr/bin/env bash
# Test dependencies pip cannot give, installed by the README's test command (and so by CI):
# Debian's chromium, which the /compare page test drives through Playwright (Playwright's own
# browser download does not work offline). Idempotent; a no-op when it is already there.
set -euo pipefail
# libtpu, for the deviceless TPU compile of tests/test_plan.py, into .libtpu/ beside the checkout
# rather than the venv: installed there it makes every CPU-only jax process probe for a TPU (about
# a second and several error lines on stderr per process). The test puts .libtpu on PYTHONPATH.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ ! -d "$ROOT/.libtpu/libtpu" ]; then
  REQ="$(python -c 'import importlib.metadata as m; print(next((r.split(";")[0].strip() for r in m.requires("jax") or [] if r.startswith("libtpu")), ""))')"
  if [ -n "$REQ" ]; then
    python -m pip install -q --no-deps --target "$ROOT/.libtpu" "$REQ" ||
      echo "tools/install_test_deps.sh: cannot install $REQ (the TPU plan test will be skipped)" >&2
  fi
fi
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "tools/install_test_deps.sh: not root and no sudo: install Debian's chromium yourself" \
         "(the browser test will be skipped)" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
