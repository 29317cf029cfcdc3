"""GRPO's rewards: each built-in on cases a user would recognise, a user's module:function from
their own directory, the weighted sum `score` returns, and the one-line error of each bad case
(a function that raises, returns NaN, too few values or no numbers; an unknown name; a missing
module or function; bad weights)."""

import sys

import numpy as np
import pytest

from conftest import make_config
from jaxft.errors import ConfigError, DataError
from jaxft.eval import answers
from jaxft.rl import rewards, scoring

CAPITALS = [{"answer": "Paris", "answerable": True}, {"answer": None, "answerable": False}]


def run(spec, completions, rows, **extra):
  """One reward's values on `completions`, rows[i] answering completion i."""
  _, per = scoring.score(spec, "", ["q"] * len(completions), completions, rows, **extra)
  return per[spec].tolist()


def one_line_error(cls, fn, *args, **kw):
  with pytest.raises(cls) as e:
    fn(*args, **kw)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_match_modes():
  said = ["Paris", "paris.", "The capital of France is Paris.", "Parisian food", "  Paris \n"]
  rows = [{"answer": "Paris"}] * len(said)
  assert run("match:exact", said, rows) == [1, 0, 0, 0, 1]
  assert run("match", said, rows) == [1, 1, 0, 0, 1]  # normalised by default
  assert run("match:normalized", said, rows) == [1, 1, 0, 0, 1]
  assert run("match:contains", said, rows) == [1, 1, 1, 0, 1]  # whole words: not "Parisian"
  # several accepted answers, a number, no answer (an unanswerable row), another field
  rows = [{"answer": ["NYC", "New York City"]}, {"answer": 42}, {"answer": None},
          {"answer": "x", "label": "the Moon"}]
  assert run("match", ["new york city!", "42", "Paris", "moon"], rows) == [1, 1, 0, 0]
  assert run("match:normalised:label", ["moon"] * 4, rows) == [0, 0, 0, 1]


def test_match_agrees_with_evaluation():
  """The reward pays what jaxft.evaluate counts: the same three matches."""
  cases = [("The Eiffel Tower.", "eiffel tower"), ("An apple", "apple"), ("Paris", " Paris "),
           ("It is 3,000 m.", "3000 m"), ("Lima, Peru", "Lima"), ("", "x")]
  for said, ref in cases:
    assert rewards.normalize(said) == answers.normalize(said)
    for mode, theirs in (("exact", answers.exact_match), ("normalised", answers.normalized_match),
                         ("contains", answers.contains_match)):
      assert run(f"match:{mode}", [said], [{"answer": ref}]) == [float(theirs(said, ref))], mode


def test_format_full_or_search():
  said = ["<answer>Paris</answer>", "I think <answer>Paris</answer>", "Paris"]
  rows = [{}] * 3
  assert run("format:<answer>.*</answer>", said, rows) == [1, 0, 0]
  assert run("format:search:<answer>.*</answer>", said, rows) == [1, 1, 0]
  # the regex is the rest of the spec, colons included
  assert run("format:(?:Answer|A): .+", ["Answer: Paris", "A: 4", "Paris"], rows) == [1, 1, 0]


def test_abstain_pays_on_unanswerable_and_costs_on_answerable():
  said = ["I don't know.", "Paris."]
  assert run("abstain", said, [CAPITALS[1]] * 2) == [1, 0]  # no such thing: abstaining pays
  assert run("abstain", said, [CAPITALS[0]] * 2) == [-1, 0]  # a known fact: abstaining costs
  assert run("abstain", ["I'm not sure, sorry.", "No such country exists."], [{}] * 2) == [-1, -1]
  assert run("abstain:known", said, [{"known": False}] * 2) == [1, 0]


def test_abstain_patterns_are_the_evaluations():
  assert rewards.ABSTAIN_PATTERNS == tuple(make_config("base").eval.abstain_patterns)
  r = scoring.resolve("abstain", abstain_patterns=(r"\bpass\b",))
  _, per = scoring.score(r, None, ["q"] * 2, ["I pass.", "I don't know."], [CAPITALS[1]] * 2)
  assert per["abstain"].tolist() == [1, 0]


def test_length_penalty_past_the_target():
  said = ["one two three", "one two three four five six", "a " * 20]
  assert run("length:4", said, [{}] * 3) == pytest.approx([0, -0.5, -1])
  assert run("length:10:chars", ["short", "x" * 15], [{}] * 2) == pytest.approx([0, -0.5])
  ids = [[1] * 8, [1] * 16]
  assert run("length:8:tokens", ["a", "b"], [{}] * 2, completion_ids=ids) == [0, -1]


def test_score_weights_and_what_functions_receive(tmp_path, monkeypatch):
  (tmp_path / "my_rewards_a.py").write_text(
      "seen = {}\n"
      "def brevity(prompts, completions, answer, **kw):\n"
      "  seen.update(prompts=prompts, answer=answer, **kw)\n"
      "  return [1.0 / len(c) for c in completions]\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  said = ["Paris", "I don't know.", "Lyon"]
  rows = [CAPITALS[0], CAPITALS[1], CAPITALS[0]]
  total, per = scoring.score("match,abstain,my_rewards_a:brevity", "1,2,0.5",
                             ["p0", "p1", "p0"], said, rows, completion_ids=[[1], [2], [3]])
  assert list(per) == ["match", "abstain", "my_rewards_a:brevity"]
  np.testing.assert_allclose(per["my_rewards_a:brevity"], [0.2, 1 / 13, 0.25], rtol=1e-6)
  np.testing.assert_allclose(total, [1 + 0.1, 2 + 0.5 / 13, 0.125], rtol=1e-6)
  import my_rewards_a
  assert my_rewards_a.seen == {"prompts": ["p0", "p1", "p0"], "answer": ["Paris", None, "Paris"],
                               "answerable": [True, False, True],
                               "completion_ids": [[1], [2], [3]]}
  # tuples work as well as strings; metrics as TRL names them
  total2, _ = scoring.score(("match", "abstain", "my_rewards_a:brevity"), (1, 2, 0.5),
                            ["p"] * 3, said, rows)
  np.testing.assert_allclose(total2, total)
  m = scoring.reward_metrics(total, per)
  assert m["rewards/match/mean"] == pytest.approx(1 / 3)
  assert m["reward_std"] == pytest.approx(np.std(total, ddof=1))


def test_user_function_from_the_working_directory(tmp_path, monkeypatch):
  (tmp_path / "my_rewards_b.py").write_text(
      "class Judge:\n  @staticmethod\n  def score(completions, **kw):\n"
      "    return [float('Paris' in c) for c in completions]\n")
  monkeypatch.chdir(tmp_path)
  # as under an installed entry point: the working directory is not on sys.path
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  assert run("my_rewards_b:Judge.score", ["Paris", "Rome"], [{}, {}]) == [1, 0]
  assert str(tmp_path) not in sys.path  # added for the import only


BAD_FUNCTIONS = {
    "raises": ("def f(completions, **kw):\n  raise KeyError('answer')\n",
               "rl.rewards: my_bad:f raised KeyError: 'answer'"),
    "nan": ("def f(completions, **kw):\n  return [0.0, float('nan')]\n",
            "rl.rewards: my_bad:f returned nan for completion 1: expected a finite number"),
    "inf": ("def f(completions, **kw):\n  return [float('-inf'), 0.0]\n",
            "rl.rewards: my_bad:f returned -inf for completion 0: expected a finite number"),
    "count": ("def f(completions, **kw):\n  return [1.0]\n",
              "rl.rewards: my_bad:f returned 1 values for 2 completions"),
    "none": ("def f(completions, **kw):\n  return [None, 1.0]\n",
             "rl.rewards: my_bad:f returned None for completion 0: expected a finite number"),
    "text": ("def f(completions, **kw):\n  return ['1', '0']\n",
             "rl.rewards: my_bad:f returned '1' for completion 0: expected a finite number"),
    "scalar": ("def f(completions, **kw):\n  return 1.0\n",
               "rl.rewards: my_bad:f returned a float: expected a list of 2 numbers, one per "
               "completion"),
    "multiline": ("def f(completions, **kw):\n  raise ValueError('first\\nsecond')\n",
                  "rl.rewards: my_bad:f raised ValueError: first second"),
}


@pytest.mark.parametrize("case", list(BAD_FUNCTIONS))
def test_a_bad_function_is_one_line_naming_it(case, tmp_path, monkeypatch):
  source, message = BAD_FUNCTIONS[case]
  (tmp_path / "my_bad.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "my_bad", raising=False)
  assert one_line_error(ConfigError, run, "my_bad:f", ["a", "b"], [{}, {}]) == message


def test_numpy_values_are_numbers(tmp_path, monkeypatch):
  (tmp_path / "my_np.py").write_text(
      "import numpy as np\ndef f(completions, **kw):\n  return np.array([0.5, 2.0])\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert run("my_np:f", ["a", "b"], [{}, {}]) == [0.5, 2.0]


def test_bad_specs_are_one_line_config_errors(tmp_path, monkeypatch):
  (tmp_path / "my_mod_c.py").write_text("x = 1\n")
  (tmp_path / "my_broken.py").write_text("import not_a_module_anywhere\n")
  (tmp_path / "my_raising.py").write_text("raise RuntimeError('no API key')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  cases = {
      "matches": "rl.rewards: unknown reward 'matches': expected one of match, format, abstain, "
                 "length, or module:function for your own",
      "no_such_mod:f": "rl.rewards: 'no_such_mod:f': no module named 'no_such_mod' (looked in "
                       "the working directory and on sys.path)",
      "my_mod_c:f": "rl.rewards: 'my_mod_c:f': module my_mod_c has no 'f'",
      "my_mod_c:x": "rl.rewards: 'my_mod_c:x': x is not a function (int)",
      "my_broken:f": "rl.rewards: 'my_broken:f': importing my_broken failed: No module named "
                     "'not_a_module_anywhere'",
      "my_raising:f": "rl.rewards: 'my_raising:f': importing my_raising raised RuntimeError: "
                      "no API key",
      "match:fuzzy": "rl.rewards: 'match:fuzzy': MODE 'fuzzy': expected one of exact, "
                     "normalised, contains",
      "format:": "rl.rewards: 'format:': expected format:REGEX or format:search:REGEX",
      "format:(unclosed": "rl.rewards: 'format:(unclosed': not a valid regular expression "
                          "(missing ), unterminated subpattern at position 0)",
      "length": "rl.rewards: 'length': expected length:N or length:N:UNIT with N a whole "
                "number >= 1",
      "length:5:lines": "rl.rewards: 'length:5:lines': UNIT 'lines': expected one of words, "
                        "chars, tokens",
      "match,match": "rl.rewards: 'match' is named twice",
      "match,,abstain": "rl.rewards='match,,abstain': name at least one reward, with none empty "
                        "(match, format, abstain, length or module:function)",
  }
  for spec, message in cases.items():
    assert one_line_error(ConfigError, scoring.resolve, spec) == message, spec


def test_bad_weights_and_rows():
  for weights, message in (
      ("1,2", "rl.reward_weights='1,2': 2 weights for 1 rewards in rl.rewards"),
      ("1,x", "rl.reward_weights='1,x': expected finite numbers, e.g. \"1,0.5\""),
      ((float("nan"),), "rl.reward_weights=(nan,): expected finite numbers, e.g. \"1,0.5\"")):
    assert one_line_error(ConfigError, scoring.score, "match", weights, ["q"], ["a"],
                          [{"answer": "a"}]) == message
  assert one_line_error(DataError, run, "match", ["Paris"], [{"label": "Paris"}]) == (
      "reward match:normalised:answer: the prompt rows have no field 'answer'")
  assert one_line_error(DataError, run, "abstain", ["I don't know"], [{"answerable": "no"}]) == (
      "reward abstain: field 'answerable' of completion 0's row must be true or false, got 'no'")
  assert one_line_error(DataError, run, "length:3:tokens", ["a"], [{}]) == (
      "reward length:...:tokens needs the completion_ids field")
