"""Reference answers and how an answer is matched against one.

A reference answer is the last assistant message of a chat row, the output of an alpaca row or the
completion of a completion row (text and tokens rows have none). A row may say
`"answerable": false` (a question with no true answer): only an abstention is right there, and it
does not count for the match accuracies. Three matches, strictest first: exact (after stripping),
normalised (SQuAD's: lower case, no punctuation or articles) and contains (the normalised
reference, as whole words, inside the normalised answer).
"""

from __future__ import annotations

import dataclasses
import re
import string

from jaxft import inference
from jaxft.data import formats, sources
from jaxft.errors import DataError
from jaxft.inference import Prompt


@dataclasses.dataclass
class Reference:
  prompt: Prompt
  answer: str
  answerable: bool = True  # False: no true answer exists; only an abstention is right


def references(spec: str, fmt: str) -> list[Reference]:
  """The rows of `spec` that have a reference answer, as (prompt, answer, answerable).
  Raises DataError (file:line) when a row's `answerable` is not true or false."""
  out = []
  for origin, row in sources.read_rows(spec):
    r = formats.parse(origin, row, fmt)
    answerable = row.get("answerable", True)
    if not isinstance(answerable, bool):
      raise DataError(f"{origin}: field 'answerable' must be true or false, got "
                      f"{answerable!r}")
    if r.messages is not None:
      msgs = r.messages
      last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
      prompt = [{"role": m["role"], "content": m["content"]} for m in msgs[:last]]
      if prompt:
        out.append(Reference(Prompt(origin, prompt), msgs[last]["content"], answerable))
    elif r.kind == "completion":
      out.append(Reference(Prompt(origin, text=r.prompt), r.completion, answerable))
  return out


def normalize(text: str) -> str:
  """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's normalisation)."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in string.punctuation)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def exact_match(answer: str, reference: str) -> bool:
  return answer.strip() == reference.strip()


def normalized_match(answer: str, reference: str) -> bool:
  return normalize(answer) == normalize(reference)


def contains_match(answer: str, reference: str) -> bool:
  """The normalised reference appears, as whole words, in the normalised answer: a chatty but
  right answer ("The capital of France is Paris.") counts for "Paris."."""
  ref = normalize(reference)
  return bool(ref) and f" {ref} " in f" {normalize(answer)} "


def accuracy(answers: list[str], refs: list[Reference]) -> dict:
  """Exact, normalised and contains match over the answerable rows (None when there are none)."""
  pairs = [(a, r.answer) for a, r in zip(answers, refs) if r.answerable]
  if not pairs:
    return {"exact_match": None, "normalized_match": None, "contains_match": None}
  return {"exact_match": sum(exact_match(a, ref) for a, ref in pairs) / len(pairs),
          "normalized_match": sum(normalized_match(a, ref) for a, ref in pairs) / len(pairs),
          "contains_match": sum(contains_match(a, ref) for a, ref in pairs) / len(pairs)}


def answer_accuracy(cfg, method, params, encoder, refs: list[Reference], *, prefix: str = "",
                    batch_size: int = 32) -> dict:
  """Greedy exact-match and normalised-match accuracy of a model held in memory (what training
  logs at its eval points with train.eval_accuracy=True), on the answerable rows."""
  refs = [r for r in refs if r.answerable]
  if not refs:
    return {}
  longest = max(len(encoder.tok(r.answer, add_special_tokens=False)["input_ids"]) for r in refs)
  dec = inference.Decoder(cfg, method, params, None)
  out = inference.answer(dec, encoder, [r.prompt for r in refs], max_new_tokens=longest + 16,
                         batch_size=batch_size)
  return {prefix + k: v for k, v in accuracy([o["answer"] for o in out], refs).items()}
