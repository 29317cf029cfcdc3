#!/usr/bin/env bash
# Test dependencies pip cannot give in the main venv, installed by the README's test command (and
# so by CI). Idempotent; each part is a no-op when it is already there.
#  1. Debian's chromium, which the /compare page test drives through Playwright (Playwright's own
#     browser download does not work offline).
#  2. .venv-tf4: a side venv with transformers 4.x and tokenizers (no torch: tokenization only),
#     so tests/test_tokenization_clients.py checks that transformers 4.x gives the ids jaxft trains
#     on, beside the main venv's transformers 5.x.
#  3. libtpu, for the deviceless TPU compile of tests/test_plan.py, into .libtpu/ beside the
#     checkout rather than the venv: installed there it makes every CPU-only jax process probe for
#     a TPU (about a second and several error lines on stderr per process). The test puts .libtpu
#     on PYTHONPATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

install_chromium() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
      echo "tools/install_test_deps.sh: not root and no sudo: install Debian's chromium yourself" \
           "(the browser test will be skipped)" >&2
      return 0
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
}

install_transformers4() {
  local venv="$ROOT/.venv-tf4"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c \
      'import transformers, sys; sys.exit(not transformers.__version__.startswith("4."))' 2>/dev/null; then
    return 0
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q "transformers==4.57.*" tokenizers sentencepiece jinja2 \
    protobuf || { echo "tools/install_test_deps.sh: could not install transformers 4.x into" \
                       "$venv (its test will be skipped)" >&2; rm -rf "$venv"; }
}

install_libtpu() {
  if [ -d "$ROOT/.libtpu/libtpu" ]; then
    return 0
  fi
  local req
  req="$(python -c 'import importlib.metadata as m; print(next((r.split(";")[0].strip() for r in m.requires("jax") or [] if r.startswith("libtpu")), ""))')"
  if [ -n "$req" ]; then
    python -m pip install -q --no-deps --target "$ROOT/.libtpu" "$req" ||
      echo "tools/install_test_deps.sh: cannot install $req (the TPU plan test will be skipped)" >&2
  fi
}

install_libtpu
install_chromium
install_transformers4
