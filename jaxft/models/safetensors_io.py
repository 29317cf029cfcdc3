"""Safetensors files of an HF checkpoint: finding them (single file or an index), refusing pickle,
reading one tensor at a time, and writing a file tensor by tensor."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import numpy as np

from jaxft.errors import CheckpointError
from jaxft.models.hf_config import read_json

INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle(path: str) -> None:
  """CheckpointError when `path` (a directory) holds only pickle weights, naming the file."""
  names = sorted(os.listdir(path))
  if any(n.endswith(".safetensors") for n in names):
    return
  for n in names:
    if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json"):
      raise CheckpointError(
          f"{os.path.join(path, n)}: pickle checkpoints are refused (loading one can run "
          "arbitrary code); convert it to safetensors (transformers: "
          "model.save_pretrained(dir, safe_serialization=True)) and point at that")


def tensor_files(path: str) -> dict[str, str]:
  """{tensor name: safetensors file} of a checkpoint directory, from the index or the file(s).

  Raises CheckpointError for no weights, pickle-only weights, an index naming a missing file.
  """
  from safetensors import safe_open
  refuse_pickle(path)
  index = os.path.join(path, INDEX)
  if os.path.isfile(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no weight_map")
    out = {}
    # Lexically (symlinks inside the directory, as the HF cache has, stay allowed).
    root = os.path.normpath(os.path.abspath(path))
    for name, f in weight_map.items():
      file = os.path.normpath(os.path.join(root, f)) if isinstance(f, str) else ""
      if not isinstance(f, str) or os.path.isabs(f) or not file.startswith(root + os.sep):
        raise CheckpointError(f"{index}: tensor {name} is in {f!r}, outside the model directory "
                              "(an index may only name files inside it)")
      if not os.path.isfile(file):
        raise CheckpointError(f"{index}: tensor {name} is in {f}, which does not exist")
      out[name] = file
    return out
  single = os.path.join(path, "model.safetensors")
  files = [single] if os.path.isfile(single) else sorted(
      os.path.join(path, n) for n in os.listdir(path)
      if n.endswith(".safetensors") and not n.startswith("consolidated"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors weights (and no {INDEX})")
  out = {}
  for file in files:
    try:
      with safe_open(file, framework="numpy") as f:
        for name in f.keys():
          out[name] = file
    except Exception as e:  # a truncated or foreign file
      raise CheckpointError(f"{file}: cannot read as safetensors ({e})") from None
  return out


def read_tensor(file: str, name: str, want: tuple[int, ...]) -> np.ndarray:
  """One tensor from a safetensors file, its shape checked before it is read."""
  from safetensors import safe_open
  # Open and close around each tensor: safetensors maps the file, and touched pages of a mapping
  # count in the process's resident memory until it is unmapped.
  with safe_open(file, framework="numpy") as f:
    sl = f.get_slice(name)
    shape = tuple(sl.get_shape())
    if shape != want:
      raise CheckpointError(f"{file}: tensor {name} has shape {list(shape)}, expected "
                            f"{list(want)} (from config.json)")
    if sl.get_dtype() not in ("F32", "BF16", "F16", "F64"):
      raise CheckpointError(f"{file}: tensor {name} has dtype {sl.get_dtype()}; expected a float "
                            "tensor (quantized checkpoints are not supported)")
    return f.get_tensor(name)


_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
              "int32": "I32", "int64": "I64", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(file: str, entries, metadata: dict | None = None) -> int:
  """Writes a safetensors file tensor by tensor, so only one tensor is on the host at a time.

  entries: (name, shape, numpy dtype, fetch) with fetch() returning that array when its turn
  comes. metadata defaults to {"format": "pt"}, which transformers requires. Returns the bytes
  of tensor data written.
  """
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, shape, dtype, _ in entries:
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _ST_DTYPES[np.dtype(dtype).name], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  with open(file, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for name, shape, dtype, fetch in entries:
      a = np.ascontiguousarray(fetch())
      if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise ValueError(f"{file}: tensor {name} is {a.dtype}{list(a.shape)}, declared "
                         f"{np.dtype(dtype)}{list(shape)}")
      f.write(a.reshape(-1).view(np.uint8).data)
  return offset


def shard_entries(entries, max_bytes: int) -> list[list]:
  """Groups (name, shape, dtype, fetch) entries in order into shards of at most max_bytes
  (a tensor larger than that gets a shard of its own)."""
  shards, cur, size = [], [], 0
  for e in entries:
    n = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
    if cur and size + n > max_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(e)
    size += n
  if cur:
    shards.append(cur)
  return shards
