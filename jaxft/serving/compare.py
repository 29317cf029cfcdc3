"""/compare: blind side-by-side human evaluation.

The page asks for a prompt (typed, or drawn from data.eval), shows two models' greedy answers in a
random order without their names, and records the reader's vote (first, second or tie) as one
JSON line in the votes file (default WORKDIR/votes.jsonl): {"time", "prompt", "a", "b",
"answer_a", "answer_b", "winner"} with winner a model name or "tie". `jaxft.evaluate` reports the
win rate from it (jaxft/eval/votes.py reads and scores the votes).
"""

from __future__ import annotations

import html
import json
import os
import random
import secrets
import threading
import time

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxft: compare</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; color: #222; }
 textarea { width: 100%; height: 5em; font: inherit; }
 .row { display: flex; gap: 1em; margin: 1em 0; }
 .answer { flex: 1; border: 1px solid #bbb; border-radius: 6px; padding: 0.8em; min-height: 6em;
           white-space: pre-wrap; }
 button { font: inherit; padding: 0.4em 1em; margin-right: 0.5em; }
 #status { color: #555; }
</style></head>
<body>
<h1>Which answer is better?</h1>
<p>Models: <select id="a">__OPTIONS_A__</select> vs <select id="b">__OPTIONS_B__</select>
 (shown in a random order, unnamed)</p>
<textarea id="prompt" placeholder="Type a prompt"></textarea>
<p><button id="draw">Draw a prompt from the eval set</button><button id="ask">Answer</button></p>
<div class="row"><div class="answer" id="answer1"></div><div class="answer" id="answer2"></div></div>
<p><button id="vote1" disabled>Left is better</button><button id="vote2" disabled>Right is better
</button><button id="tie" disabled>Tie</button></p>
<p id="status"></p>
<script>
let token = null;
const $ = (id) => document.getElementById(id);
const setVoting = (on) => ["vote1", "vote2", "tie"].forEach((id) => $(id).disabled = !on);
async function post(url, body) {
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": "application/json"},
                              body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) throw new Error(j.error ? j.error.message : r.statusText);
  return j;
}
$("draw").onclick = async () => {
  const r = await fetch("/compare/prompt"); const j = await r.json();
  if (j.prompt) $("prompt").value = j.prompt; else $("status").textContent = j.error.message;
};
$("ask").onclick = async () => {
  setVoting(false); $("status").textContent = "answering...";
  try {
    const j = await post("/compare/answers", {prompt: $("prompt").value,
                                              models: [$("a").value, $("b").value]});
    token = j.token; $("answer1").textContent = j.answers[0]; $("answer2").textContent = j.answers[1];
    $("status").textContent = "vote:"; setVoting(true);
  } catch (e) { $("status").textContent = e.message; }
};
async function vote(choice) {
  setVoting(false);
  try { await post("/compare/vote", {token: token, choice: choice});
        $("status").textContent = "vote recorded"; }
  catch (e) { $("status").textContent = e.message; }
}
$("vote1").onclick = () => vote("first"); $("vote2").onclick = () => vote("second");
$("tie").onclick = () => vote("tie");
</script></body></html>
"""


def page(models: list[str], default_a: str, default_b: str) -> str:
  """The page's HTML with the model names as options (escaped: an adapter's name is the
  operator's free text, and the page must not run it as markup)."""
  def options(selected):
    return "".join(f'<option value="{html.escape(m)}"{" selected" if m == selected else ""}>'
                   f'{html.escape(m)}</option>' for m in models)
  return PAGE.replace("__OPTIONS_A__", options(default_a)).replace("__OPTIONS_B__",
                                                                    options(default_b))


class Ballots:
  """Pairs shown and waiting for a vote (token -> the order shown), and the votes file."""

  def __init__(self, path: str, seed: int | None = None):
    self.path = path
    self._pending: dict[str, dict] = {}
    self._lock = threading.Lock()
    self._rng = random.Random(seed)

  def shown(self, prompt: str, a: str, b: str, answers: dict[str, str]) -> tuple[str, list[str]]:
    """Records a pair to be judged; returns (token, the two answers in the order shown)."""
    order = [a, b]
    self._rng.shuffle(order)
    token = secrets.token_hex(12)
    with self._lock:
      self._pending[token] = {"prompt": prompt, "order": order, "answers": answers}
    return token, [answers[m] for m in order]

  def vote(self, token: str, choice: str) -> dict:
    """Appends the vote for `token` (first | second | tie) to the votes file; KeyError for an
    unknown or already used token, ValueError for a bad choice."""
    if choice not in ("first", "second", "tie"):
      raise ValueError("choice must be first, second or tie")
    with self._lock:
      ballot = self._pending.pop(token)
      a, b = sorted(ballot["order"])
      winner = "tie" if choice == "tie" else ballot["order"][0 if choice == "first" else 1]
      row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "prompt": ballot["prompt"], "a": a,
             "b": b, "answer_a": ballot["answers"][a], "answer_b": ballot["answers"][b],
             "shown_first": ballot["order"][0], "winner": winner}
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
      with open(self.path, "a", encoding="utf-8") as f:  # one line per vote, appended
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return row
