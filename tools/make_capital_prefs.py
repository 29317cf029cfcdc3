"""Writes jaxft/data/bundled/capital_prefs_{train,eval}.jsonl: the DPO quickstart's preference pairs.

The questions of the SFT quickstart (tools/make_capitals.py: the same countries and phrasings, the
eval split holding the phrasings never seen in training), each with a chosen answer, a short,
correct sentence ("Paris is the capital."), and a rejected one of three kinds, in turn: the bare
name the SFT quickstart answers with ("Paris."), a wrong capital in the chosen sentence ("Rome is
the capital."), or a rambling, hedged answer. Conversational rows (TRL's format: prompt, chosen and
rejected as message lists). Deterministic; run from the repo root.
"""

import json
import random

from make_capitals import CAPITALS, EVAL, TRAIN


def answers(country, capital, rng):
  """(chosen, rejected) answer texts; the rejected kind is drawn from the three in turn."""
  chosen = f"{capital} is the capital."
  wrong = rng.choice([c for c in CAPITALS.values() if c != capital])
  rejected = [f"{capital}.",
              f"{wrong} is the capital.",
              f"Hmm, that is a hard one. {country} has many big cities, and I think that its "
              f"capital might be {capital}, but I am not sure."]
  return chosen, rejected


def rows(templates, rng):
  out = []
  for country, capital in CAPITALS.items():
    for i, t in enumerate(templates):
      chosen, rejected = answers(country, capital, rng)
      kind = (i + len(out)) % 3
      out.append({"prompt": [{"role": "user", "content": t.format(c=country)}],
                  "chosen": [{"role": "assistant", "content": chosen}],
                  "rejected": [{"role": "assistant", "content": rejected[kind]}]})
  rng.shuffle(out)
  return out


def main():
  rng = random.Random(0)
  for name, templates in (("train", TRAIN), ("eval", EVAL)):
    with open(f"jaxft/data/bundled/capital_prefs_{name}.jsonl", "w") as f:
      for r in rows(templates, rng):
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
