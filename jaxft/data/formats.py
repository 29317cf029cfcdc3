"""Row formats (chat, alpaca, completion, text, tokens), their detection, and target masks.

Every row becomes an `Example`: token ids and a boolean mask of the tokens the loss is taken on
(assistant turns, outputs, completions; every token for text and unmasked tokens rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxft.errors import DataError

FORMATS = ("chat", "alpaca", "completion", "text", "tokens")
ROLES = ("system", "user", "assistant", "developer", "tool")
_KEYS = {"chat": ("messages",), "alpaca": ("instruction", "output"),
         "completion": ("prompt", "completion"), "text": ("text",), "tokens": ("input_ids",)}


@dataclasses.dataclass
class Example:
  ids: np.ndarray   # int32 [n]
  mask: np.ndarray  # bool [n]: token i is a target
  # a row marked "distill": true: with train.base_kl > 0 every token is trained toward the base
  # model's predictions, none toward the row's own text (else it is a plain row)
  distill: bool = False


def detect(origin: str, row: dict[str, Any]) -> str:
  """The format of one row, from its keys; raises DataError naming the row when none fits."""
  if "chosen" in row or "rejected" in row:
    raise DataError(f"{origin}: a preference row (chosen/rejected) in a supervised run: set "
                    "train.objective=dpo, orpo or simpo to train on pairs")
  for fmt in FORMATS:
    if all(k in row for k in _KEYS[fmt]):
      return fmt
  raise DataError(f"{origin}: cannot tell the format from keys {sorted(row)}; expected one of "
                  + "; ".join(f"{f}: {', '.join(_KEYS[f])}" for f in FORMATS))


def field(origin, row, key, kind=str):
  """row[key], which must be a `kind`; DataError naming the row and the field otherwise."""
  if key not in row:
    raise DataError(f"{origin}: missing required field {key!r}")
  v = row[key]
  if not isinstance(v, kind):
    raise DataError(f"{origin}: field {key!r} must be {kind.__name__}, got {type(v).__name__}")
  return v


@dataclasses.dataclass(frozen=True)
class Row:
  """One validated row: its format and what that format holds (messages for chat and alpaca,
  prompt and completion, text, or the row itself for tokens)."""
  kind: str
  messages: list | None = None
  prompt: str = ""
  completion: str = ""
  text: str = ""
  row: dict | None = None


def parse(origin: str, row: dict[str, Any], fmt: str = "auto") -> Row:
  """The one reading of a row's format (training, evaluation and inference all use it): `fmt`
  (or, for auto, `detect`), the fields that format needs, validated. Raises DataError naming the
  row and the field."""
  kind = detect(origin, row) if fmt == "auto" else fmt
  if kind in ("chat", "alpaca"):
    return Row(kind, messages=to_messages(origin, row, kind))
  if kind == "completion":
    return Row(kind, prompt=field(origin, row, "prompt"),
               completion=field(origin, row, "completion"))
  if kind == "text":
    return Row(kind, text=field(origin, row, "text"))
  if "input_ids" not in row:
    raise DataError(f"{origin}: missing required field 'input_ids'")
  return Row(kind, row=row)


def to_messages(origin: str, row: dict[str, Any], fmt: str) -> list[dict[str, str]]:
  """Chat and alpaca rows as a validated list of {role, content} messages."""
  if fmt == "alpaca":
    instruction = field(origin, row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
      raise DataError(f"{origin}: field 'input' must be str, got {type(extra).__name__}")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": field(origin, row, "output")}]
  messages = field(origin, row, "messages", list)
  if not messages:
    raise DataError(f"{origin}: 'messages' is empty")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      raise DataError(f"{origin}: messages[{i}] must be an object with role and content")
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
      raise DataError(f"{origin}: messages[{i}] has unknown role {role!r}; expected one of "
                      f"{', '.join(ROLES)}")
    if not isinstance(content, str):
      raise DataError(f"{origin}: messages[{i}].content must be a string")
    # OpenAI's fine-tuning files may carry weight: 0 to exclude an assistant turn from the loss.
    out.append({"role": role, "content": content, "weight": m.get("weight", 1)})
  if not any(m["role"] == "assistant" for m in out):
    raise DataError(f"{origin}: no assistant message: nothing to train on")
  return out


def tokens_example(origin: str, row: dict[str, Any], vocab_size: int) -> Example:
  """A pre-tokenized row: input_ids and an optional loss_mask of the same length."""
  ids = row["input_ids"]
  if not isinstance(ids, list) or not ids or not all(
      isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise DataError(f"{origin}: 'input_ids' must be a non-empty list of integers")
  arr = np.asarray(ids, np.int64)
  if arr.min() < 0 or arr.max() >= vocab_size:
    raise DataError(f"{origin}: 'input_ids' holds ids outside [0, {vocab_size})")
  mask = row.get("loss_mask")
  if mask is None:
    m = np.ones(len(ids), bool)
  else:
    if not isinstance(mask, list) or len(mask) != len(ids):
      raise DataError(f"{origin}: 'loss_mask' must be a list as long as 'input_ids' ({len(ids)})")
    if not all(m in (0, 1) and isinstance(m, (bool, int)) for m in mask):
      raise DataError(f"{origin}: 'loss_mask' must hold only 0/1 or true/false")
    m = np.asarray(mask, bool)
  return Example(arr.astype(np.int32), m)
