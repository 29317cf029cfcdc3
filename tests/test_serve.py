"""jaxft.serve on loopback: the official openai client, concurrent requests batched together,
OpenAI-shaped errors that leave the server answering."""

import concurrent.futures
import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import ROOT  # noqa: E402
from jaxft import configlib, inference, serve, session, trainer  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name the capital of Peru.", "Capital of Japan?",
           "Which city is the capital of Kenya?"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  import uvicorn
  c = configlib.sibling(os.path.join(ROOT, "configs", "quickstart.py"), "quickstart").get_config()
  c.model.preset = "tiny"
  c.train.progress = False
  c.train.steps = 30
  c.optim.lr = 1e-2
  wd = str(tmp_path_factory.mktemp("serve") / "tuned")
  trainer.train(c, wd)
  # A second fine-tune of the same base: another rank, targets and learning rate.
  c.peft.lora.rank, c.peft.targets, c.optim.lr = 4, "q_proj,v_proj,down_proj", 3e-2
  other = str(tmp_path_factory.mktemp("serve") / "other")
  trainer.train(c, other)
  models = serve.load_models(wd, {"other": other}, slots=4, context=256)
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(serve.make_app(models, max_queue=64), host="127.0.0.1",
                                      port=port, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  deadline = time.time() + 60
  while not srv.started and time.time() < deadline:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
  yield {"client": client, "port": port, "workdir": wd, "other": other}
  srv.should_exit = True
  thread.join(30)


def _answers(workdir, base=False):
  """jaxft.generate's greedy answers (its decoder and batch) for PROMPTS."""
  config = session.load_workdir_config(workdir)
  enc = session.encoder(config, workdir)
  dec = inference.load_decoder(config, workdir, base=base)
  prompts = [inference.Prompt("p", [{"role": "user", "content": p}]) for p in PROMPTS]
  return [r["answer"] for r in inference.answer(dec, enc, prompts, max_new_tokens=8)]


@pytest.fixture(scope="module")
def reference(server):
  return _answers(server["workdir"])


def test_models_and_health(server):
  names = [m.id for m in server["client"].models.list().data]
  assert names == ["tuned", "other", "base"]
  import urllib.request
  health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/health"))
  assert health["status"] == "ok"


def test_chat_greedy_equals_generate(server, reference):
  for prompt, want in zip(PROMPTS, reference):
    r = server["client"].chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": prompt}], max_tokens=8,
        temperature=0)
    assert r.choices[0].message.content.strip() == want
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5


def test_streaming_gives_the_same_text(server, reference):
  stream = server["client"].chat.completions.create(
      model="tuned", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8,
      temperature=0, stream=True)
  text, finishes = "", []
  for ev in stream:
    text += ev.choices[0].delta.content or ""
    finishes.append(ev.choices[0].finish_reason)
  assert text.strip() == reference[0]
  assert finishes[-1] in ("stop", "length") and all(f is None for f in finishes[:-1])


def test_concurrent_requests_get_their_single_request_answers(server, reference):
  client = server["client"]

  def ask(i):
    p = PROMPTS[i % len(PROMPTS)]
    r = client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": p}],
                                       max_tokens=8, temperature=0)
    return i, r.choices[0].message.content.strip()

  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    answers = list(pool.map(ask, range(24)))
  for i, a in answers:
    assert a == reference[i % len(PROMPTS)], i


def test_completions_endpoint_and_sampling_seed(server):
  c = server["client"]
  a = c.completions.create(model="tuned", prompt="The capital of", max_tokens=6,
                           temperature=1.0, seed=7)
  b = c.completions.create(model="tuned", prompt="The capital of", max_tokens=6,
                           temperature=1.0, seed=7)
  assert a.choices[0].text == b.choices[0].text
  assert a.object == "text_completion"


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "malformed JSON"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(),
     "unknown model"),
    (json.dumps({"model": "tuned", "messages": [{"role": "user", "content": "x"}],
                 "max_tokens": -3}).encode(), "'max_tokens' must be >= 1"),
    (json.dumps({"model": "tuned", "messages": [{"role": "user", "content": "word " * 20000}]})
     .encode(), "context"),
    (json.dumps({"model": "tuned", "messages": [{"role": "user", "content": "x"}],
                 "temperature": "hot"}).encode(), "'temperature' must be a number"),
])
def test_bad_requests_are_400_and_the_server_keeps_answering(server, reference, body, needle):
  import urllib.error
  import urllib.request
  req = urllib.request.Request(f"http://127.0.0.1:{server['port']}/v1/chat/completions",
                               data=body, headers={"Content-Type": "application/json"})
  with pytest.raises(urllib.error.HTTPError) as e:
    urllib.request.urlopen(req)
  assert e.value.code == 400
  err = json.load(e.value)["error"]
  assert needle in err["message"] and err["type"] == "invalid_request_error"
  r = server["client"].chat.completions.create(
      model="tuned", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=8,
      temperature=0)
  assert r.choices[0].message.content.strip() == reference[1]


def test_two_adapters_and_the_base_in_one_batch(server, reference):
  """Requests for three models decode in the same batch (one engine: each row picks its LoRA);
  each answer equals that model's own single-model decoding."""
  want = {"tuned": reference, "other": _answers(server["other"]),
          "base": _answers(server["workdir"], base=True)}
  assert want["tuned"] != want["other"] and want["other"] != want["base"]
  client = server["client"]

  def ask(job):
    model, i = job
    r = client.chat.completions.create(model=model, messages=[{"role": "user",
                                                                "content": PROMPTS[i]}],
                                       max_tokens=8, temperature=0)
    return model, i, r.choices[0].message.content.strip()

  jobs = [(m, i) for i in range(len(PROMPTS)) for m in ("tuned", "other", "base")]
  with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
    for model, i, answer in pool.map(ask, jobs):
      assert answer == want[model][i], (model, i)
