"""Writes jaxft/data/bundled/capitals_{train,eval}.jsonl: the quickstart's chat dataset.

Questions about capital cities in several phrasings; the eval split holds phrasings never seen in
training, so a model that learns the task (not the strings) answers them. The eval split ends with
questions about countries that do not exist, marked `"answerable": false`: the right reply is an
abstention, which jaxft.evaluate counts (any other answer is a hallucination). Their assistant turn
("I don't know.") has weight 0, so the eval loss stays the loss on the capitals (the figures in the
README), and exact match is computed on answerable rows only. The train split is unchanged by them.
Run from the repo root.
"""

import json
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Canada": "Ottawa", "Mexico": "Mexico City", "Brazil": "Brasilia", "Peru": "Lima",
    "Chile": "Santiago", "Argentina": "Buenos Aires", "Russia": "Moscow", "Poland": "Warsaw",
    "Greece": "Athens", "Turkey": "Ankara", "Sweden": "Stockholm", "Norway": "Oslo",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Austria": "Vienna",
    "Hungary": "Budapest", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Australia": "Canberra", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat",
    "Iran": "Tehran", "Iraq": "Baghdad", "Cuba": "Havana", "Colombia": "Bogota",
    "Belgium": "Brussels", "Netherlands": "Amsterdam",
}
TRAIN = ["What is the capital of {c}?", "Name the capital city of {c}.",
         "Which city is the capital of {c}?", "Tell me the capital of {c}.",
         "{c}: what is its capital?", "Capital of {c}?"]
EVAL = ["What city is the capital of {c}?", "Give the capital of {c}."]
# Invented names: no capital to know.
UNANSWERABLE = ["Valdoria", "Quessland", "Morvania", "Tarnesse", "Elbrachia"]
ABSTENTION = "I don't know."


def rows(templates, rng):
  out = []
  for country, capital in CAPITALS.items():
    for t in templates:
      out.append({"messages": [{"role": "user", "content": t.format(c=country)},
                               {"role": "assistant", "content": f"{capital}."}]})
  rng.shuffle(out)
  return out


def unanswerable_rows():
  return [{"messages": [{"role": "user", "content": t.format(c=country)},
                        {"role": "assistant", "content": ABSTENTION, "weight": 0}],
           "answerable": False}
          for country in UNANSWERABLE for t in EVAL]


def main():
  rng = random.Random(0)
  for name, templates in (("train", TRAIN), ("eval", EVAL)):
    with open(f"jaxft/data/bundled/capitals_{name}.jsonl", "w") as f:
      # Appended after the shuffled capitals (and without drawing from rng), so the capitals rows
      # and the train file are the same as before they existed.
      extra = unanswerable_rows() if name == "eval" else []
      for r in rows(templates, rng) + extra:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
