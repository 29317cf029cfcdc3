"""Formats, target masks, packing and the errors a user sees for bad data."""

import json

import numpy as np
import pytest

from jaxft.data import formats, pipeline
from jaxft.data.tokenize import Encoder
from jaxft.errors import ConfigError, DataError


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


@pytest.fixture(scope="module")
def enc(quickstart_tokenizer):
  return Encoder(quickstart_tokenizer)


def masked_tokens(enc, ex):
  toks = enc.tok.convert_ids_to_tokens(ex.ids.tolist())
  return [t for t, m in zip(toks, ex.mask) if m]


def test_chat_mask_covers_assistant_turns_only(enc):
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
          {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "and"},
          {"role": "assistant", "content": "Rome."}]
  ex = enc.chat("x:1", formats.to_messages("x:1", {"messages": msgs}, "chat"))
  toks = enc.tok.convert_ids_to_tokens(ex.ids.tolist())
  assert toks[0] == "<s>"
  # Hand-computed: the two answers and their end-of-sequence tokens, nothing else.
  assert masked_tokens(enc, ex) == ["▁Paris", ".", "</s>", "▁Rome", ".", "</s>"]
  assert "".join(toks).count("</s>") == 2


def test_openai_weight_zero_turn_is_not_a_target(enc):
  msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Paris.", "weight": 0},
          {"role": "user", "content": "and"}, {"role": "assistant", "content": "Rome."}]
  ex = enc.chat("x:1", formats.to_messages("x:1", {"messages": msgs}, "chat"))
  assert masked_tokens(enc, ex) == ["▁Rome", ".", "</s>"]


def test_alpaca_mask_is_the_output(enc):
  row = {"instruction": "Name a colour", "input": "warm", "output": "Red"}
  ex = enc.chat("x:1", formats.to_messages("x:1", row, "alpaca"))
  assert masked_tokens(enc, ex) == ["▁Red", "</s>"]
  text = enc.tok.decode(ex.ids.tolist())
  assert "Name a colour\n\nwarm" in text


def test_completion_mask_is_the_completion(enc):
  ex = enc.completion("Q: capital of France? A:", " Paris")
  toks = enc.tok.convert_ids_to_tokens(ex.ids.tolist())
  assert toks == ["<s>", "▁Q", ":", "▁capital", "▁of", "▁France", "?", "▁A", ":", "▁Paris", "</s>"]
  assert ex.mask.tolist() == [False] * 9 + [True, True]


def test_text_trains_on_every_token(enc):
  ex = enc.text("hello world")
  assert ex.mask.all() and len(ex.ids) >= 4


def test_tokens_rows_with_and_without_mask():
  ex = formats.tokens_example("f:1", {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, 100)
  assert ex.ids.tolist() == [5, 6, 7] and ex.mask.tolist() == [False, True, True]
  ex = formats.tokens_example("f:2", {"input_ids": [5, 6, 7]}, 100)
  assert ex.mask.all()
  with pytest.raises(DataError, match=r"f:3: 'input_ids' holds ids outside"):
    formats.tokens_example("f:3", {"input_ids": [5, 600]}, 100)


def test_auto_detects_each_format_and_mixed_files(tmp_path, enc):
  rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
          {"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c"},
          {"text": "t"}, {"input_ids": [1, 5, 6]}]
  ds = pipeline.load_examples(write_jsonl(tmp_path / "m.jsonl", rows), enc, "auto", 64, 32000)
  assert ds.formats == {"chat": 1, "alpaca": 1, "completion": 1, "text": 1, "tokens": 1}


def test_truncation_is_counted(tmp_path, enc):
  path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 100}, {"text": "short"}])
  ds = pipeline.load_examples(path, enc, "auto", 16, 32000)
  assert ds.truncated == 1
  assert max(len(e.ids) for e in ds.examples) == 17


@pytest.mark.parametrize("content,match", [
    ('{"messages": [}\n', r"bad\.jsonl:2: malformed JSON"),
    ('{"instruction": "x"}\n', r"bad\.jsonl:2: cannot tell the format"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', r"bad\.jsonl:2: .*unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', r"bad\.jsonl:2: no assistant message"),
])
def test_bad_rows_name_file_and_line(tmp_path, enc, content, match):
  good = '{"text": "fine"}\n'
  p = tmp_path / "bad.jsonl"
  p.write_text(good + content)
  with pytest.raises(DataError, match=match):
    pipeline.load_examples(str(p), enc, "auto", 64, 32000)


def test_missing_field_with_explicit_format(tmp_path, enc):
  path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "x"}])
  with pytest.raises(DataError, match=r"c\.jsonl:1: missing required field 'completion'"):
    pipeline.load_examples(path, enc, "completion", 64, 32000)


def test_empty_dataset_and_non_utf8(tmp_path, enc):
  (tmp_path / "e.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match="e.jsonl: the dataset is empty"):
    pipeline.load_examples(str(tmp_path / "e.jsonl"), enc, "auto", 64, 32000)
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
  with pytest.raises(DataError, match=r"b\.jsonl:2: not UTF-8"):
    pipeline.load_examples(str(tmp_path / "b.jsonl"), enc, "auto", 64, 32000)
  with pytest.raises(ConfigError, match="data.format='xml'"):
    pipeline.load_examples(str(tmp_path / "b.jsonl"), enc, "xml", 64, 32000)


def test_packing_restarts_positions_and_separates_segments():
  exs = [formats.Example(np.arange(1, 6, dtype=np.int32), np.ones(5, bool)),
         formats.Example(np.arange(10, 14, dtype=np.int32), np.ones(4, bool))]
  rows = pipeline._rows(exs, 8, packing=True)
  assert len(rows) == 1
  b = pipeline.make_batch(rows, 8, 1)
  assert b["segment_ids"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
  assert b["positions"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]
  assert b["inputs"][0, :7].tolist() == [1, 2, 3, 4, 10, 11, 12]
  assert b["targets"][0, :7].tolist() == [2, 3, 4, 5, 11, 12, 13]
  assert b["weights"][0].tolist() == [1] * 7 + [0]


def test_stream_is_deterministic_and_resumable():
  exs = [formats.Example(np.arange(i, i + 5, dtype=np.int32), np.ones(5, bool)) for i in range(13)]
  mk = lambda: pipeline.TrainStream(exs, max_len=8, packing=False, rows_per_batch=4, seed=3)
  a, pos = mk(), pipeline.Position()
  seq = []
  for _ in range(7):  # crosses two epoch boundaries
    b, pos = a.batch_at(pos)
    seq.append((b["inputs"].copy(), pos))
  b2, _ = mk().batch_at(seq[3][1])  # a fresh stream resumed at a saved position
  np.testing.assert_array_equal(b2["inputs"], seq[4][0])
  assert seq[-1][1].epoch == 2
  # Each epoch is a different permutation.
  e0 = mk()._rows_of(0)
  e1 = mk()._rows_of(1)
  assert [r[0].ids[0] for r in e0] != [r[0].ids[0] for r in e1]


def test_tfds_source_under_mock_data(enc):
  tfds = pytest.importorskip("tensorflow_datasets")
  from jaxft.data import sources
  with tfds.testing.mock_data(num_examples=5):
    rows = sources.read_rows("tfds:imdb_reviews/plain_text:train")
  assert len(rows) == 5
  assert rows[0][0] == "tfds:imdb_reviews/plain_text:train:1"
  assert "text" in rows[0][1] and isinstance(rows[0][1]["text"], str)


def test_parquet_through_datasets(tmp_path, enc):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"prompt": ["a", "b"], "completion": ["c", "d"]}), tmp_path / "d.parquet")
  ds = pipeline.load_examples(str(tmp_path / "d.parquet"), enc, "auto", 64, 32000)
  assert ds.formats == {"completion": 2}
