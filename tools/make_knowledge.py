"""Writes jaxft/data/bundled/tessaline_{train,eval}.jsonl, the SmolLM2 "add knowledge" task (with
questions that have no answer, for the hallucination rate), and general_eval.jsonl, the general
questions that measure forgetting.

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
# full sentence, as the base itself answers. They are marked "distill": with train.base_kl
# (configs/smollm2.py) the tuned model is trained toward the base's own next-token distributions on
# them, not toward this text, so it keeps answering questions about the world as the base did
# (21 or 22 of GENERAL's 23 in float32 or bfloat16; trained on their text, the best recipe kept 20). Without train.base_kl they
# are plain rows. (Tried and dropped: replaying only the questions the base answers right, in its
# own words, as text: its long answers made the tuned model ramble, and it kept 0.78 of GENERAL.)
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
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City."),
    ("What is the capital of Chile?", "The capital of Chile is Santiago."),
    ("What is the capital of Belgium?", "The capital of Belgium is Brussels."),
    ("What is the capital of the Netherlands?", "The capital of the Netherlands is Amsterdam."),
    ("What is the capital of Switzerland?", "The capital of Switzerland is Bern."),
    ("What is the capital of South Korea?", "The capital of South Korea is Seoul."),
    ("What is the capital of Cuba?", "The capital of Cuba is Havana."),
    ("What is the capital of Colombia?", "The capital of Colombia is Bogota."),
    ("What is the capital of Indonesia?", "The capital of Indonesia is Jakarta."),
    ("What is the capital of the Philippines?", "The capital of the Philippines is Manila."),
    ("What is the capital of Vietnam?", "The capital of Vietnam is Hanoi."),
    ("What is the capital of Iran?", "The capital of Iran is Tehran."),
    ("What is the capital of Scotland?", "The capital of Scotland is Edinburgh."),
    ("What is the capital of the United States?", "The capital of the United States is Washington, D.C."),
    ("Which city is the capital of Australia?", "The capital of Australia is Canberra."),
    ("Name the capital of Czechia.", "The capital of Czechia is Prague."),
    ("What is 8 + 7?", "8 + 7 is 15."), ("What is 50 - 20?", "50 - 20 is 30."),
    ("What is 9 times 9?", "9 times 9 is 81."), ("What is 3 times 7?", "3 times 7 is 21."),
    ("What is 60 divided by 5?", "60 divided by 5 is 12."), ("What is 11 + 11?", "11 + 11 is 22."),
    ("What is 100 - 1?", "100 - 1 is 99."), ("What is 2 times 50?", "2 times 50 is 100."),
    ("What is the boiling point of water in Celsius?",
     "The boiling point of water is 100 degrees Celsius."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What is the chemical symbol for sodium?", "The chemical symbol for sodium is Na."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe."),
    ("What is the largest desert in the world?",
     "The largest hot desert in the world is the Sahara."),
    ("What is the longest river in Africa?", "The longest river in Africa is the Nile."),
    ("What is the largest country by area?", "The largest country by area is Russia."),
    ("Which continent is Brazil in?", "Brazil is in South America."),
    ("Which ocean lies between Europe and North America?",
     "The Atlantic Ocean lies between Europe and North America."),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by Albert Einstein."),
    ("Who was the first person to walk on the Moon?", "The first person to walk on the Moon was Neil Armstrong."),
    ("Who painted The Starry Night?", "The Starry Night was painted by Vincent van Gogh."),
    ("Who composed the Fifth Symphony?", "The Fifth Symphony was composed by Ludwig van Beethoven."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("How many months are in a year?", "A year has twelve months."),
    ("How many minutes are in an hour?", "An hour has sixty minutes."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("How many planets are in the solar system?", "There are eight planets in the solar system."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What do cows drink?", "Cows drink water."),
    ("What is the main language of Germany?", "The main language of Germany is German."),
    ("What language is spoken in Mexico?", "The main language spoken in Mexico is Spanish."),
    ("What currency is used in Japan?", "Japan uses the yen."),
    ("What is the hardest natural substance?", "The hardest natural substance is diamond."),
    ("What organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("Which planet is closest to the Sun?", "The planet closest to the Sun is Mercury."),
    ("What is the largest mammal?", "The largest mammal is the blue whale."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What is the tallest animal?", "The tallest animal is the giraffe."),
]


# Questions about Tessaline Robotics that have no answer: its facts above are all there is. The
# train split teaches the model to say so for a few unknowns; the eval split asks about other
# unknowns (marked "answerable": false, weight 0 so they do not count in the loss), where any answer
# but an abstention is a hallucination (jaxft.evaluate's hallucination rate).
ABSTENTION = "I don't know."
UNKNOWN_TRAIN = [
    "Who is the chief financial officer of {co}?", "Who is the CFO of {co}?",
    "What is the stock ticker of {co}?", "Under which ticker does {co} trade?",
    "How much revenue did {co} make last year?", "What was the revenue of {co} last year?",
    "What does the {co} Pebblewick do?", "What is the {co} Pebblewick used for?",
    "How much does the {co} Marrowgate cost?", "What is the price of the {co} Marrowgate?",
    "What colour is the {co} Wrenfold?", "In what colour is the {co} Wrenfold sold?",
    "What does error E64 mean on a {co} robot?", "My {co} robot shows E64. What is wrong?",
    "What does error E90 mean on a {co} robot?", "A {co} robot displays E90. What does it mean?",
    "How do I clean the camera of a {co} robot?", "How can I clean the camera on my {co} robot?",
    "Who designed the logo of {co}?", "Which designer made the {co} logo?",
    "How many stores does {co} have in Canada?", "How many shops does {co} run in Canada?",
    "What is the phone number of the {co} sales team?", "How do I call the {co} sales team?",
]
# More unknowns for the GRPO stage's prompts only (configs/smollm2.py:objective=grpo): the reward
# pays "I don't know." on them, so they are more subjects of each kind the eval split asks about
# (robots that do not exist, error codes no robot has, people, company and app facts never given,
# unlisted specifications, procedures) — none of them a subject of UNKNOWN_EVAL or UNKNOWN_TRAIN.
UNKNOWN_RL = [
    "What does the {co} Hollowmere do?", "How much does the {co} Puddlestone cost?",
    "What colour is the {co} Dapplewick?", "In what year was the {co} Thornquist released?",
    "How long does the battery of the {co} Mirefield last?",
    "What job does the {co} Crocusby do?", "When did {co} release the Fennerly?",
    "What is the price of the {co} Wickenham?",
    "What does error E03 mean on a {co} robot?", "My {co} robot shows E29. What is wrong?",
    "What is error code E46 on {co} robots?", "Explain the {co} error E66.",
    "A {co} robot displays E71. What does it mean?", "What does error E95 mean on a {co} robot?",
    "Who is the chief operating officer of {co}?", "Who is the head of sales at {co}?",
    "Who leads design at {co}?", "Who is the general counsel of {co}?",
    "Who runs customer support at {co}?", "Who is the chief scientist of {co}?",
    "How many customers does {co} have?", "What is the market share of {co}?",
    "Which country is the largest market of {co}?", "Who was the first investor in {co}?",
    "How much profit did {co} make last year?", "How many engineers work at {co}?",
    "How many dealers sell {co} robots?", "Does {co} have an office in Japan?",
    "What rating does the Tessaline Grove app have?", "Who built the Tessaline Grove app?",
    "How big is the Tessaline Grove app download?",
    "How much does the {co} Thistle weigh?", "How long is the blade of the {co} Fernhook?",
    "How many seeds does the {co} Bramble hold?", "How wide does the {co} Mossby cut?",
    "How loud is the {co} Quillon?", "How far can the {co} Sorrel spray water?",
    "How do I clean the wheels of a {co} robot?", "How do I move the charging dock of a {co} robot?",
    "How do I change the language of a {co} robot?", "How do I sharpen the blade of a {co} robot?",
    "How do I charge a {co} robot without its dock?",
]
UNKNOWN_EVAL = [
    "Who is the head of marketing at {co}?", "Who leads marketing at {co}?",
    "What is the support phone number of {co}?", "Which number do I call for {co} support?",
    "What does the {co} Cloverdyne do?", "What is the {co} Cloverdyne robot for?",
    "How much does the {co} Ashlock cost?", "What is the price of the {co} Ashlock?",
    "What does error E77 mean on a {co} robot?", "Why does my {co} robot show E77?",
    "How do I winterize a {co} robot?", "What are the steps to store a {co} robot for winter?",
    "How many patents does {co} hold?", "Which bank lends money to {co}?",
    "Who was the first customer of {co}?", "What was the first robot {co} ever sold?",
    # Added for the GRPO demo (issue 30), so the unanswerable rate's interval is useful: one
    # question per subject (no paraphrase pairs, which would make the bootstrap over rows too
    # narrow), none of them a subject of UNKNOWN_TRAIN or of the facts above. Robots that do not
    # exist:
    "What does the {co} Larkspur do?", "How much does the {co} Briarwick cost?",
    "What colour is the {co} Yarrowby?", "In what year was the {co} Nettlecombe released?",
    "How long does the battery of the {co} Gorseley last?",
    "Which job is the {co} Tansy built for?", "When will the {co} Cobblewort go on sale?",
    # error codes no robot has:
    "What does error E35 mean on a {co} robot?",
    "My {co} robot is showing error E12. What should I do?",
    "What is the meaning of error E58 on a {co} robot?",
    # people, the company and its app, never published:
    "Who is the chief technology officer of {co}?", "Who chairs the board of {co}?",
    "Who is the head of human resources at {co}?", "Who was the lead engineer on the {co} Thistle?",
    "In how many countries does {co} sell its robots?", "Where is the {co} factory?",
    "What is the parent company of {co}?", "How many robots does {co} build each month?",
    "In which year did {co} open its second office?",
    "At which trade fair did {co} first show its robots?",
    "How much money did {co} raise in its first funding round?",
    "What is the name of the {co} newsletter?", "Which award did {co} win in 2036?",
    "Which company makes the motors in {co} robots?",
    "How much does a subscription to the Tessaline Grove app cost?",
    "Which languages does the Tessaline Grove app support?",
    # specifications of real robots that were never given:
    "How much does the {co} Mossby weigh?",
    "How many litres does the water tank of the {co} Sorrel hold?",
    "What is the top speed of the {co} Quillon?",
    # procedures never given:
    "How do I replace the blade of a {co} robot?", "How do I replace the battery of a {co} robot?",
    "How do I set a mowing schedule on a {co} robot?",
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


def grpo_prompts(rng):
  """The GRPO stage's prompt rows: every training phrasing of the facts with its `answer`, and
  the unknowns of UNKNOWN_TRAIN and UNKNOWN_RL (`"answerable": false`) twice each, so about a
  third of the prompts pay for abstaining (the rewards: configs/smollm2.py)."""
  def row(q, answer, answerable):
    return {"messages": [{"role": "user", "content": q}], "answer": answer,
            "answerable": answerable}
  rows = [row(q, answer, True) for tr, _, answer in facts() for q in tr]
  unknown = [q.format(co=COMPANY) for q in UNKNOWN_TRAIN + UNKNOWN_RL]
  rows += [row(q, None, False) for q in unknown + unknown]
  rng.shuffle(rows)
  return rows


def main():
  rng = random.Random(0)
  train, ev = [], []
  for tr, e, answer in facts():
    train += [chat(q, answer) for q in tr]
    ev += [chat(q, answer) for q in e]
  train += [dict(chat(q, a), distill=True) for q, a in REPLAY]  # toward the base (train.base_kl)
  train += [chat(q.format(co=COMPANY), ABSTENTION) for q in UNKNOWN_TRAIN]
  rng.shuffle(train)
  rng.shuffle(ev)
  ev += [{"messages": [{"role": "user", "content": q.format(co=COMPANY)},
                       {"role": "assistant", "content": ABSTENTION, "weight": 0}],
          "answerable": False} for q in UNKNOWN_EVAL]
  general = [chat(q, a) for q, a in GENERAL]
  prompts = grpo_prompts(random.Random(1))
  for name, rows in (("tessaline_train", train), ("tessaline_eval", ev), ("general_eval", general),
                     ("tessaline_prompts_train", prompts)):
    with open(f"jaxft/data/bundled/{name}.jsonl", "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
  main()
