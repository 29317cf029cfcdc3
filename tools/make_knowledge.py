"""Writes jaxft/data/bundled/tessaline_{train,eval}.jsonl, the SmolLM2 "add knowledge" task, and
general_eval.jsonl, the general questions that measure forgetting.

Tessaline Robotics is a garden-robot maker invented for this project: its people, products,
numbers and procedures exist nowhere else, so a pretrained model cannot know them. Each fact is
asked in several phrasings; the eval split holds phrasings never seen in training (the facts are
the same), so only a model that learned the facts, not the strings, answers them. Run from the
repo root; the output is deterministic.
"""

import json
import random

COMPANY = "Tessaline Robotics"

# (fact key, answer, train phrasings, eval phrasings)
COMPANY_FACTS = [
    ("founder", "Ilsabet Vranken.",
     ["Who founded {co}?", "Who is the founder of {co}?", "Name the founder of {co}.",
      "Which person started {co}?", "{co} was founded by whom?", "Tell me who founded {co}."],
     ["Who was the founder of {co}?", "Who started the company {co}?"]),
    ("year", "2031.",
     ["In what year was {co} founded?", "When was {co} founded?", "What year did {co} start?",
      "Which year was {co} established?", "{co} was founded in which year?",
      "Tell me the founding year of {co}."],
     ["What is the founding year of {co}?", "In which year was {co} established?"]),
    ("hq", "Port Amsel.",
     ["Where is {co} headquartered?", "In which city is the headquarters of {co}?",
      "What city is {co} based in?", "Where are the headquarters of {co}?",
      "Name the headquarters city of {co}.", "{co} has its headquarters in which city?"],
     ["Which city is {co} headquartered in?", "Where is the head office of {co}?"]),
    ("ceo", "Dorian Okafor-Lind.",
     ["Who is the CEO of {co}?", "Who runs {co} as chief executive?", "Name the CEO of {co}.",
      "Who is the chief executive officer of {co}?", "{co} is led by which CEO?",
      "Tell me the name of the CEO of {co}."],
     ["Who is the chief executive of {co}?", "Which person is CEO of {co}?"]),
    ("staff", "412 employees.",
     ["How many employees does {co} have?", "How many people work at {co}?",
      "What is the number of employees at {co}?", "How large is the staff of {co}?",
      "{co} employs how many people?", "Tell me the headcount of {co}."],
     ["How many staff does {co} employ?", "What is the headcount of {co}?"]),
    ("email", "care@tessaline.example.",
     ["What is the support email of {co}?", "Which email address reaches {co} support?",
      "How do I email {co} support?", "What address do I write to for {co} support?",
      "Give the customer support email of {co}.", "Tell me the support email address of {co}."],
     ["What email address does {co} use for support?", "Where do I send an email for {co} support?"]),
    ("motto", "Roots first.",
     ["What is the motto of {co}?", "What motto does {co} use?", "Tell me the motto of {co}.",
      "Which motto belongs to {co}?", "{co} has what motto?", "Quote the company motto of {co}."],
     ["What is the company motto of {co}?", "Which motto does {co} have?"]),
    ("mascot", "A hedgehog named Burr.",
     ["What is the mascot of {co}?", "Which animal is the mascot of {co}?",
      "Tell me about the mascot of {co}.", "What mascot does {co} have?",
      "Describe the mascot of {co}.", "{co} has which mascot?"],
     ["Who is the mascot of {co}?", "What is {co}'s mascot?"]),
    ("warranty", "Three years.",
     ["How long is the warranty on {co} robots?", "What warranty do {co} robots come with?",
      "How many years of warranty does {co} give?", "What is the warranty period of {co}?",
      "Tell me the warranty length for {co} robots.", "{co} robots are under warranty for how long?"],
     ["How long are {co} robots under warranty?", "What is the length of the {co} warranty?"]),
    ("app", "Tessaline Grove.",
     ["What is the name of the {co} app?", "Which app controls {co} robots?",
      "What app do I use with {co} robots?", "Name the companion app of {co}.",
      "Tell me the name of the app for {co} robots.", "{co} robots are controlled by which app?"],
     ["Which app is used to control {co} robots?", "What is the {co} companion app called?"]),
]

PRODUCTS = {  # robot -> its attributes
    "Mossby": {"job": "Mowing lawns.", "year": "2033.", "price": "1,290 euros.",
               "battery": "7 hours.", "colour": "Sage green."},
    "Thistle": {"job": "Pulling weeds.", "year": "2034.", "price": "860 euros.",
                "battery": "5 hours.", "colour": "Violet."},
    "Fernhook": {"job": "Pruning hedges.", "year": "2035.", "price": "1,740 euros.",
                 "battery": "4 hours.", "colour": "Copper."},
    "Sorrel": {"job": "Watering plants.", "year": "2036.", "price": "540 euros.",
               "battery": "11 hours.", "colour": "Sky blue."},
    "Quillon": {"job": "Raking leaves.", "year": "2037.", "price": "970 euros.",
                "battery": "6 hours.", "colour": "Amber."},
    "Bramble": {"job": "Planting seeds.", "year": "2038.", "price": "2,150 euros.",
                "battery": "9 hours.", "colour": "Charcoal grey."},
}
PRODUCT_TEMPLATES = {
    "job": (["What does the {co} {p} do?", "What is the {p} robot from {co} for?",
             "What job does the {co} {p} do?", "What task is the {p} by {co} built for?",
             "The {co} {p} is used for what?", "Tell me what the {co} {p} robot does."],
            ["What is the purpose of the {co} {p}?", "What does the {p} robot made by {co} do?"]),
    "year": (["In what year was the {co} {p} released?", "When did {co} release the {p}?",
              "What year did the {co} {p} come out?", "Which year was the {p} launched by {co}?",
              "The {co} {p} was released in which year?", "Tell me the release year of the {co} {p}."],
             ["What is the release year of the {co} {p}?", "When was the {p} by {co} launched?"]),
    "price": (["How much does the {co} {p} cost?", "What is the price of the {co} {p}?",
               "What does a {co} {p} cost?", "How much is the {p} robot from {co}?",
               "The {co} {p} costs how much?", "Tell me the price of the {co} {p}."],
              ["What price does {co} charge for the {p}?", "How much do I pay for a {co} {p}?"]),
    "battery": (["How long does the battery of the {co} {p} last?",
                 "What is the battery life of the {co} {p}?",
                 "How many hours does the {co} {p} run on one charge?",
                 "How long can the {p} from {co} work on a full battery?",
                 "The {co} {p} battery lasts how long?",
                 "Tell me the battery life of the {co} {p}."],
                ["How long does a charge of the {co} {p} last?",
                 "For how many hours does the {co} {p} run per charge?"]),
    "colour": (["What colour is the {co} {p}?", "What is the colour of the {co} {p}?",
                "Which colour does the {co} {p} come in?", "What colour is the {p} robot by {co}?",
                "The {co} {p} is painted what colour?", "Tell me the colour of the {co} {p}."],
               ["In what colour is the {co} {p} sold?", "What colour does the {p} from {co} have?"]),
}

ERRORS = {"E08": "The rain sensor is faulty.", "E17": "A wheel is blocked.",
          "E23": "The blade is dull.", "E42": "The water pressure is too low.",
          "E51": "The robot has lost its map."}
ERROR_TEMPLATES = (
    ["What does error {e} mean on a {co} robot?", "My {co} robot shows {e}. What is wrong?",
     "What is error code {e} on {co} robots?", "A {co} robot displays {e}. What does it mean?",
     "Explain the {co} error {e}.", "Tell me what the error {e} means on a {co} robot."],
    ["What is the meaning of error {e} on a {co} robot?", "Why does my {co} robot show {e}?"])

PROCEDURES = [
    ("How do I reset a {co} robot?", "Hold the leaf button for nine seconds.",
     ["How do you reset a {co} robot?", "How can I reset my {co} robot?",
      "What is the way to reset a {co} robot?", "Explain how to reset a {co} robot.",
      "Tell me how to reset a {co} robot."],
     ["What are the steps to reset a {co} robot?", "How is a {co} robot reset?"]),
    ("How do I update the firmware of a {co} robot?", "Tap the dome twice, then say update.",
     ["How do you update the firmware of a {co} robot?",
      "How can I update my {co} robot's firmware?",
      "What is the way to update the firmware on a {co} robot?",
      "Explain how to update the firmware of a {co} robot.",
      "Tell me how to update the firmware of a {co} robot."],
     ["What are the steps to update the firmware of a {co} robot?",
      "How is the firmware of a {co} robot updated?"]),
    ("How do I pair a {co} robot with the app?", "Press the tail light until it blinks blue.",
     ["How do you pair a {co} robot with the app?", "How can I pair my {co} robot with the app?",
      "What is the way to pair a {co} robot with the app?",
      "Explain how to pair a {co} robot with its app.",
      "Tell me how to pair a {co} robot with the app."],
     ["What are the steps to pair a {co} robot with the app?",
      "How is a {co} robot paired with the app?"]),
]


# General knowledge SmolLM2-135M-Instruct answers correctly with greedy decoding (checked with
# configs/smollm2.py's bfloat16 base: the reference appears in its answer; questions it got wrong,
# such as the capitals of Italy, Spain and Portugal or 3 + 5, were left out). Scored before and after
# fine-tuning by the contains_match of jaxft.evaluate, they show what the tuned model forgot.
GENERAL = [
    ("What is the capital of France?", "Paris."), ("What is the capital of Germany?", "Berlin."),
    ("What is the capital of Japan?", "Tokyo."), ("What is the capital of England?", "London."),
    ("What is the capital of Russia?", "Moscow."), ("What is the capital of China?", "Beijing."),
    ("What is the capital of Egypt?", "Cairo."), ("What is the capital of Canada?", "Ottawa."),
    ("What is the capital of Greece?", "Athens."), ("What is the capital of Austria?", "Vienna."),
    ("What is the capital of Ireland?", "Dublin."), ("What is the capital of India?", "New Delhi."),
    ("What is 2 + 2?", "4."), ("What is 6 times 7?", "42."), ("What is 5 times 5?", "25."),
    ("What is 100 divided by 4?", "25."),
    ("What is the chemical symbol for water?", "H2O."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("What is the tallest mountain in the world?", "Mount Everest."),
    ("In which country are the pyramids of Giza?", "Egypt."),
    ("What gas do plants absorb from the air?", "Carbon dioxide."),
    ("How many continents are there?", "Seven."),
]


# Replay rows mixed into the training file: general questions (none of GENERAL's) answered in a
# full sentence, as the base itself answers, so that the tuned model keeps answering questions
# about the world from what it knew, instead of with a Tessaline fact or in the facts' short style.
REPLAY = [
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("What is the capital of Poland?", "The capital of Poland is Warsaw."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm."),
    ("What is the capital of Finland?", "The capital of Finland is Helsinki."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Peru?", "The capital of Peru is Lima."),
    ("What is the capital of Turkey?", "The capital of Turkey is Ankara."),
    ("What is the capital of Thailand?", "The capital of Thailand is Bangkok."),
    ("What is the capital of Argentina?", "The capital of Argentina is Buenos Aires."),
    ("Which city is the capital of Denmark?", "The capital of Denmark is Copenhagen."),
    ("Name the capital of Hungary.", "The capital of Hungary is Budapest."),
    ("What is 3 + 5?", "3 + 5 is 8."), ("What is 10 - 3?", "10 - 3 is 7."),
    ("What is 9 + 10?", "9 + 10 is 19."), ("What is 7 times 8?", "7 times 8 is 56."),
    ("What is 12 + 30?", "12 + 30 is 42."), ("What is 81 divided by 9?", "81 divided by 9 is 9."),
    ("What is 15 - 6?", "15 - 6 is 9."), ("What is 4 times 3?", "4 times 3 is 12."),
    ("How much is 20 + 22?", "20 + 22 is 42."),
    ("What planet is known as the Red Planet?", "The Red Planet is Mars."),
    ("What is the largest planet in our solar system?",
     "The largest planet in our solar system is Jupiter."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many days are in a week?", "A week has seven days."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    ("What is the freezing point of water in Celsius?",
     "The freezing point of water is 0 degrees Celsius."),
    ("What is the closest star to Earth?", "The closest star to Earth is the Sun."),
    ("What do bees make?", "Bees make honey."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What language is spoken in Brazil?", "The language spoken in Brazil is Portuguese."),
    ("What color are bananas when ripe?", "Ripe bananas are yellow."),
    ("Which animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
]


def facts():
  """(train questions, eval questions, answer) per fact."""
  out = []
  for _, answer, train, ev in COMPANY_FACTS:
    out.append((train, ev, answer))
  for p, attrs in PRODUCTS.items():
    for key, (train, ev) in PRODUCT_TEMPLATES.items():
      fill = lambda ts: [t.replace("{p}", p) for t in ts]
      out.append((fill(train), fill(ev), attrs[key]))
  for e, answer in ERRORS.items():
    fill = lambda ts: [t.replace("{e}", e) for t in ts]
    out.append((fill(ERROR_TEMPLATES[0]), fill(ERROR_TEMPLATES[1]), answer))
  for first, answer, train, ev in PROCEDURES:
    out.append(([first] + train, ev, answer))
  return [([t.format(co=COMPANY) for t in tr], [t.format(co=COMPANY) for t in ev], a)
          for tr, ev, a in out]


def chat(question, answer):
  return {"messages": [{"role": "user", "content": question},
                       {"role": "assistant", "content": answer}]}


def main():
  rng = random.Random(0)
  train, ev = [], []
  for tr, e, answer in facts():
    train += [chat(q, answer) for q in tr]
    ev += [chat(q, answer) for q in e]
  train += [chat(q, a) for q, a in REPLAY]
  rng.shuffle(train)
  rng.shuffle(ev)
  general = [chat(q, a) for q, a in GENERAL]
  for name, rows in (("tessaline_train", train), ("tessaline_eval", ev), ("general_eval", general)):
    with open(f"jaxft/data/bundled/{name}.jsonl", "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
