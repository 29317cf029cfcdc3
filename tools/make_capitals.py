"""Writes jaxft/data/bundled/capitals_{train,eval}.jsonl: the quickstart's chat dataset.

Questions about capital cities in several phrasings; the eval split holds phrasings never seen in
training, so a model that learns the task (not the strings) answers them. Run from the repo root.
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


def rows(templates, rng):
  out = []
  for country, capital in CAPITALS.items():
    for t in templates:
      out.append({"messages": [{"role": "user", "content": t.format(c=country)},
                               {"role": "assistant", "content": f"{capital}."}]})
  rng.shuffle(out)
  return out


def main():
  rng = random.Random(0)
  for name, templates in (("train", TRAIN), ("eval", EVAL)):
    with open(f"jaxft/data/bundled/capitals_{name}.jsonl", "w") as f:
      for r in rows(templates, rng):
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
