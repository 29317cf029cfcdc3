"""`python -m jaxft.data` (jaxft/data/show.py): the first rows as training sees them and the counts
of the whole file, through training's own tokenization and masking. In process, with what the
command's _main calls (the objective's preview, session.encoder, session.model_config);
tests/test_docs.py runs the command as README.md shows it."""

import json

import pytest

from conftest import make_config
from jaxft import objectives, session
from jaxft.data import show
from jaxft.data.tokenize import DEFAULT_CHAT_TEMPLATE
from jaxft.errors import ConfigError


@pytest.fixture(scope="module")
def quickstart(quickstart_tokenizer):
  """The quickstart config, its encoder and vocabulary size, as the command builds them (from
  the session's quickstart tokenizer directory: the one the command writes, already written)."""
  config = make_config("quickstart")
  tok_config = make_config("quickstart", **{"model.tokenizer": quickstart_tokenizer.name_or_path})
  encoder = session.encoder(tok_config, "/nonexistent")
  return config, encoder, session.model_config(config).vocab_size


def _preview(config, encoder, vocab, split="train"):
  return objectives.from_config(config, False).preview(config, encoder, vocab, split)


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_quickstart_rows_show_the_template_the_ids_and_the_tokens_that_carry_loss(quickstart):
  config, encoder, vocab = quickstart
  shown = _preview(config, encoder, vocab).rows(3)
  assert len(shown) == 3
  tok = encoder.tok
  for i, (s, row) in enumerate(zip(shown, _rows(config.data.train)), 1):
    # Independently: the quickstart tokenizer has no template, so jaxft's default renders it.
    text = tok.apply_chat_template(row["messages"], chat_template=DEFAULT_CHAT_TEMPLATE,
                                   tokenize=False)
    assert s.text == text and s.origin.endswith(f"capitals_train.jsonl:{i}") and s.kind == "chat"
    assert s.example.ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    answer = row["messages"][1]["content"]
    loss_ids = s.example.ids[s.example.mask].tolist()
    assert tok.decode(loss_ids) == f"{answer}</s>"  # the answer and its EOS, nothing else
    plain = show.format_row(i, s, encoder, config.data.max_len, color=False)
    assert plain[0].endswith(f"chat): {len(s.example.ids)} tokens, {len(loss_ids)} carry loss")
    assert plain[1] == "  template: " + text.replace("\n", "\\n")
    assert plain[2].endswith("«" + " ".join(map(str, loss_ids)) + "» 28705 13 13")
    assert plain[3] == ("  loss:     <s> User: " + row["messages"][0]["content"] +
                        f"\\n\\nAssistant:« {answer}</s>» \\n\\n")
    colored = "\n".join(show.format_row(i, s, encoder, config.data.max_len, color=True))
    assert f"\x1b[1;32m {answer}</s>\x1b[0m" in colored and "«" not in colored


def test_quickstart_counts(quickstart):
  config, encoder, vocab = quickstart
  ds = _preview(config, encoder, vocab).counts()
  rows = _rows(config.data.train)
  tok = encoder.tok
  render = lambda r: tok.apply_chat_template(r["messages"], chat_template=DEFAULT_CHAT_TEMPLATE,
                                            tokenize=False)
  lengths = [len(tok(render(r), add_special_tokens=False)["input_ids"]) for r in rows]
  assert max(lengths) <= config.data.max_len + 1  # so none is truncated
  assert show.format_counts("f", ds, config.data.max_len) == [
      "f:", f"  rows:                      {len(rows)} (chat {len(rows)})",
      f"  tokens:                    {sum(lengths):,} ({ds.target_tokens} carry loss)",
      "  rows truncated:            0 (to data.max_len=128)",
      "  rows with no target token: 0"]


def test_truncated_rows_and_rows_with_no_target_are_counted(quickstart, tmp_path):
  config, encoder, vocab = quickstart
  long_prompt = " ".join(["word"] * 40)
  rows = [
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes."}]},
      # an assistant turn with weight 0: no target
      {"messages": [{"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "No.", "weight": 0}]},
      # truncation cuts the whole answer: truncated and no target
      {"prompt": long_prompt, "completion": " The end."},
      # truncated, the start of the text still trained
      {"text": long_prompt},
  ]
  data = tmp_path / "rows.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  c = make_config("quickstart", **{"data.train": str(data), "data.max_len": 16})
  preview = _preview(c, encoder, vocab)
  shown = preview.rows(10)
  assert [s.kind for s in shown] == ["chat", "chat", "completion", "text"]
  assert [int(s.example.mask.sum()) for s in shown[:3]] == [3, 0, 0]
  assert shown[3].example.mask.tolist() == [False] + [True] * 16  # all but the first token
  assert [s.tokens_before > len(s.example.ids) == 17 for s in shown] == [False, False, True,
                                                                          True]
  assert "; truncated from" in show.format_row(3, shown[2], encoder, 16, False)[0]
  ds = preview.counts()
  assert (sum(ds.formats.values()), ds.truncated, ds.no_target) == (4, 2, 2)
  assert ds.tokens == sum(len(s.example.ids) for s in shown)
  assert show.format_counts(str(data), ds, 16)[3:] == [
      "  rows truncated:            2 (to data.max_len=16; e.g. line 3, 4)",
      "  rows with no target token: 2; e.g. line 2, 3"]


def test_preference_pairs_show_chosen_and_rejected(quickstart):
  config = make_config("quickstart", "objective=dpo")
  _, encoder, vocab = quickstart
  preview = _preview(config, encoder, vocab)
  shown = preview.rows(2)
  row = _rows(config.data.train)[0]
  assert [(s.side, s.origin.rsplit(":", 1)[1]) for s in shown] == [
      ("chosen", "1"), ("rejected", "1"), ("chosen", "2"), ("rejected", "2")]
  for s, key in zip(shown, ("chosen", "rejected")):
    answer = row[key][-1]["content"]
    assert encoder.tok.decode(s.example.ids[s.example.mask].tolist()) == f"{answer}</s>"
  lines = show.format_rows(preview.path, shown, encoder, config.data.max_len, color=False)
  assert lines[0].endswith("the first 2 rows as training sees them (tokens that carry loss in "
                           "«guillemets»)")
  heads = [line.split(" (")[0] for line in lines if line.startswith("row ")]
  assert heads == ["row 1 chosen", "row 1 rejected", "row 2 chosen", "row 2 rejected"]
  counts = preview.counts()
  assert (counts.formats, counts.truncated, counts.no_target) == (
      {"conversational": len(_rows(config.data.train))}, 0, 0)


@pytest.mark.parametrize("over,rows,needle", [
    ({"data.format": "csv"}, 3, "data.format='csv'"),
    ({}, -1, "--rows=-1: must be >= 0"),
    ({"data.train": ""}, 3, "data.train is empty"),
])
def test_bad_settings_name_the_key(quickstart, over, rows, needle):
  _, encoder, vocab = quickstart
  with pytest.raises(ConfigError, match=needle.replace("-", r"\-")):
    _preview(make_config("quickstart", **over), encoder, vocab).rows(rows)


def test_grpo_prompt_rows_show_what_the_policy_reads_and_the_reward_fields(quickstart):
  config = make_config("quickstart", "objective=grpo")
  _, encoder, vocab = quickstart
  preview = _preview(config, encoder, vocab)
  (s,) = preview.rows(1)
  row = _rows(config.data.train)[0]
  assert s.text == encoder.render(row["messages"], add_generation_prompt=True)
  assert s.text.endswith("Assistant:") and not s.example.mask.any()
  lines = show.format_row(1, s, encoder, config.data.max_len, color=False)
  assert lines[-1] == "  fields:   " + json.dumps({k: v for k, v in row.items() if k != "messages"})
  counts = preview.counts()
  assert (counts.formats, counts.target_tokens, counts.no_target) == (
      {"prompt": len(_rows(config.data.train))}, 0, len(_rows(config.data.train)))


def test_an_objective_without_a_preview_says_so():
  from jaxft.objectives import Objective
  with pytest.raises(ConfigError, match="train.objective='toy': python -m jaxft.data does not "
                                        "show its rows"):
    Objective.preview(None, make_config("quickstart", **{"train.objective": "toy"}), None, 0)
