"""jaxft.serve on loopback: the official openai client, concurrent requests batched together,
OpenAI-shaped errors that leave the server answering."""

import concurrent.futures
import json
import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import ROOT, make_config  # noqa: E402
from jaxft import inference, session, trainer  # noqa: E402
from jaxft.serving import server as serve  # noqa: E402
from jaxft.eval import votes as human_votes  # noqa: E402
from jaxft.serving import compare  # noqa: E402

PROMPTS = ["What is the capital of France?", "Name the capital of Peru.", "Capital of Japan?",
           "Which city is the capital of Kenya?"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  import uvicorn
  c = make_config("quickstart")
  c.model.preset = "tiny"
  c.train.progress = False
  c.train.steps = 30
  c.train.eval_batches = 1  # (no test here reads the eval loss)
  c.optim.lr = 1e-2
  wd = str(tmp_path_factory.mktemp("serve") / "tuned")
  trainer.train(c, wd)
  # A second fine-tune of the same base: another rank, targets and learning rate.
  c.peft.lora.rank, c.peft.targets, c.optim.lr = 4, "q_proj,v_proj,down_proj", 3e-2
  other = str(tmp_path_factory.mktemp("serve") / "other")
  trainer.train(c, other)
  models = serve.load_models(wd, {"other": other}, slots=4, context=256)
  port = _free_port()
  votes = str(tmp_path_factory.mktemp("votes") / "votes.jsonl")
  app = serve.make_app(models, max_queue=64, ballots=compare.Ballots(votes, seed=0),
                       eval_prompts=serve.eval_prompts(wd))
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **serve.SERVER_OPTIONS))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  deadline = time.time() + 60
  while not srv.started and time.time() < deadline:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
  yield {"client": client, "port": port, "workdir": wd, "other": other, "votes": votes,
         "models": models}
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


@pytest.mark.slow
def test_an_idle_connection_outlives_a_clients_pool_expiry(server):
  """A client's pool (httpx: the openai client) reuses an idle connection for up to 5 s; the
  server keeps it open longer, so a request sent on it as the 5 s run out is answered, not reset
  (with uvicorn's 5 s default the second request below finds the connection closed)."""
  import http.client
  conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
  for wait in (0, 6):
    time.sleep(wait)
    conn.request("GET", "/health")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
  conn.close()


@pytest.mark.slow
def test_models_and_health(server):
  names = [m.id for m in server["client"].models.list().data]
  assert names == ["tuned", "other", "base"]
  import urllib.request
  health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/health"))
  assert health["status"] == "ok"


@pytest.mark.slow
def test_chat_greedy_equals_generate(server, reference):
  for prompt, want in zip(PROMPTS, reference):
    r = server["client"].chat.completions.create(
        model="tuned", messages=[{"role": "user", "content": prompt}], max_tokens=8,
        temperature=0)
    assert r.choices[0].message.content.strip() == want
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_completions_endpoint_and_sampling_seed(server):
  c = server["client"]
  a = c.completions.create(model="tuned", prompt="The capital of", max_tokens=6,
                           temperature=1.0, seed=7)
  b = c.completions.create(model="tuned", prompt="The capital of", max_tokens=6,
                           temperature=1.0, seed=7)
  assert a.choices[0].text == b.choices[0].text
  assert a.object == "text_completion"


@pytest.mark.slow
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


@pytest.mark.slow
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


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (the README's "
                    "test command installs it with tools/install_test_deps.sh)")
def test_compare_page_in_a_browser_records_votes(server, tmp_path):
  """The /compare page driven in headless Chromium: three blind votes land in the votes file and
  the win-rate report counts them."""
  sync_api = pytest.importorskip("playwright.sync_api")
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{server['port']}/compare")
    assert page.locator("#a").input_value() == "tuned"
    assert page.locator("#b").input_value() == "base"
    for choice in ("#vote1", "#vote2", "#tie"):
      page.click("#draw")
      page.wait_for_function("document.getElementById('prompt').value.length > 0")
      page.click("#ask")
      page.wait_for_selector(f"{choice}:not([disabled])", timeout=120_000)
      assert page.locator("#answer1").inner_text() != "" or page.locator("#answer2").inner_text()
      if choice == "#tie":
        page.screenshot(path=str(tmp_path / "compare.png"))
      page.click(choice)
      page.wait_for_function("document.getElementById('status').textContent == 'vote recorded'")
    browser.close()
  votes = human_votes.read_votes(server["votes"])
  assert len(votes) == 3 and votes[-1]["winner"] == "tie"
  assert all({v["a"], v["b"]} == {"tuned", "base"} for v in votes)
  # The first vote chose the left answer, the second the right one: the winners are the models
  # shown there, whichever order the page drew.
  assert votes[0]["winner"] == votes[0]["shown_first"]
  assert votes[1]["winner"] != votes[1]["shown_first"] and votes[1]["winner"] != "tie"
  rates = human_votes.win_rates(votes)
  assert len(rates) == 1 and rates[0]["votes"] == 3 and rates[0]["ties"] == 1
  assert rates[0]["a_wins"] + rates[0]["b_wins"] == 2
  assert os.path.getsize(tmp_path / "compare.png") > 5000
  os.makedirs(os.path.join(ROOT, "docs"), exist_ok=True)
  if os.environ.get("JAXFT_WRITE_DOC_IMAGES"):
    shutil.copyfile(tmp_path / "compare.png", os.path.join(ROOT, "docs", "compare.png"))


def test_win_rates_count_ties_half():
  votes = [{"a": "x", "b": "y", "winner": "x"}, {"a": "y", "b": "x", "winner": "x"},
           {"a": "x", "b": "y", "winner": "tie"}, {"a": "x", "b": "y", "winner": "y"}]
  (r,) = human_votes.win_rates(votes)
  assert (r["a"], r["b"], r["votes"], r["a_wins"], r["b_wins"], r["ties"]) == ("x", "y", 4, 2, 1, 1)
  assert r["a_win_rate"] == pytest.approx(2.5 / 4)
  assert r["ci95"][0] <= 2.5 / 4 <= r["ci95"][1]


@pytest.mark.slow
def test_a_client_that_disconnects_cancels_its_request(server):
  import http.client
  health = lambda: json.loads(urllib_get(f"http://127.0.0.1:{server['port']}/health"))
  before = health()["finished"]["tuned"].get("cancelled", 0)
  conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
  conn.request("POST", "/v1/completions", json.dumps(
      {"model": "tuned", "prompt": "Tell me a long story", "max_tokens": 200, "temperature": 0,
       "stream": True, "stop": ["never-appears-0"]}), {"Content-Type": "application/json"})
  resp = conn.getresponse()
  assert resp.status == 200
  resp.fp.readline()  # the first event arrived: the request is decoding
  conn.sock.shutdown(socket.SHUT_RDWR)
  conn.close()
  deadline = time.time() + 60
  while time.time() < deadline and health()["finished"]["tuned"].get("cancelled", 0) == before:
    time.sleep(0.1)
  assert health()["finished"]["tuned"].get("cancelled", 0) == before + 1


def urllib_get(url):
  import urllib.request
  with urllib.request.urlopen(url) as r:
    return r.read()


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish(server, tmp_path):
  """The base (random weights) answers at full length, so the signal lands mid-answer."""
  import subprocess
  import sys
  import urllib.request
  port = _free_port()
  proc = subprocess.Popen([sys.executable, "-m", "jaxft.serve", f"--workdir={server['workdir']}",
                           f"--port={port}", "--context=256",
                           f"--votes={tmp_path / 'v.jsonl'}"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while time.time() < deadline:
      try:
        urllib_get(f"http://127.0.0.1:{port}/health")
        break
      except OSError:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(
        {"model": "base", "prompt": "Once", "max_tokens": 120, "temperature": 0, "stream": True,
         "stop": ["never-appears-0"]}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
      first = resp.readline()
      assert first.startswith(b"data: ")
      proc.send_signal(subprocess.signal.SIGTERM)
      rest = resp.read().decode()
    events = [json.loads(line[6:]) for line in rest.splitlines()
              if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]")
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    # uvicorn ends by re-raising the signal once it has drained, as servers do for supervisors.
    assert proc.wait(timeout=120) in (0, -subprocess.signal.SIGTERM)
    assert "Traceback" not in proc.stderr.read()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_a_full_queue_is_429_in_openai_shape():
  from fastapi.testclient import TestClient
  served = {"m": compare_served("m", FakeEngine(queued=10))}
  with TestClient(serve.make_app(served, max_queue=4)) as client:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
  assert r.status_code == 429
  assert r.json()["error"]["type"] == "rate_limit_exceeded"


def compare_served(name, engine, prompt_ids=None):
  from jaxft.serving import api
  return api.Served(name, engine, None,
                    prompt_ids or (lambda messages=None, text=None: [1, 2, 3]))


class FakeEngine:
  """An engine with no model that answers "ok" at once (or fails each request, `fail`): the HTTP
  layer's tests need no compile."""
  slots, context, error = 2, 64, ""

  def __init__(self, queued=0, failure="", fail=False):
    self.queued, self._failure, self.fail = queued, failure, fail
    self.submitted, self.finished_by_row = [], {}

  def busy(self, row=None):
    del row
    return self.queued

  def failure(self):
    return self._failure

  def room(self, n):
    return self.context - n

  def submit(self, req):
    self.submitted.append(req)
    req.tokens, req.text = [1], "ok"
    req.finish = "error" if self.fail else "length"
    req.error = "RuntimeError: the device fell over" if self.fail else ""
    req.on_done(req.finish)

  def cancel(self, req):
    req.cancelled = True

  def stop(self, finish_running):
    del finish_running


def _fake_client(engine=None, name="m", **kw):
  from fastapi.testclient import TestClient
  served = {name: compare_served(name, engine or FakeEngine(), kw.pop("prompt_ids", None)),
            "base": compare_served("base", FakeEngine())}
  return TestClient(serve.make_app(served, **kw))


def _chat(**over):
  return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **over}


@pytest.mark.parametrize("body,param,needle", [
    # Issue 29: choice 1 of n=2 would have seed 2**63, past what jax.random.key takes.
    (_chat(seed=2**63 - 1, n=2, temperature=1), "seed", "for 2 choices"),
    (_chat(top_k=2**40), "top_k", "<= 2147483647"),
    (_chat(max_tokens=10**400), "max_tokens", "does not fit"),
    (_chat(n=9), "n", "'n' must be <= 8"),
    (_chat(top_p=0), "top_p", "'top_p' must be > 0"),
    (_chat(logprobs=True), "logprobs", "not supported"),
    (_chat(presence_penalty=1.5), "presence_penalty", "not supported"),
], ids=["seed+n-1", "top_k", "max_tokens", "n", "top_p", "logprobs", "presence_penalty"])
def test_numbers_out_of_range_are_400_before_the_engine(body, param, needle):
  engine = FakeEngine()
  with _fake_client(engine) as client:
    r = client.post("/v1/chat/completions", json=body)
    ok = client.post("/v1/chat/completions", json=_chat(seed=2**63 - 2, n=2, top_k=50,
                                                        logprobs=False, presence_penalty=0))
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == param and needle in err["message"], err
  assert ok.status_code == 200 and len(engine.submitted) == 2  # only the good request's choices


def test_a_request_the_engine_fails_on_is_500_for_it_alone():
  with _fake_client(FakeEngine(fail=True)) as client:
    r = client.post("/v1/chat/completions", json=_chat())
    s = client.post("/v1/chat/completions", json=_chat(stream=True))
    other = client.post("/v1/chat/completions", json=_chat(model="base"))
  assert r.status_code == 500 and "the device fell over" in r.json()["error"]["message"]
  assert '"type": "server_error"' in s.text and "[DONE]" not in s.text
  assert other.status_code == 200 and other.json()["choices"][0]["message"]["content"] == "ok"


def test_health_reports_a_stopped_engine():
  with _fake_client(FakeEngine(failure="XlaRuntimeError: out of memory")) as client:
    r = client.get("/health")
  assert r.status_code == 503
  assert r.json()["status"] == "error"
  assert r.json()["stopped"] == {"m": "XlaRuntimeError: out of memory"}


def test_a_body_over_the_limit_is_413_unread():
  big = json.dumps(_chat(stop="x" * 5000)).encode()
  with _fake_client(max_body=4000) as client:
    declared = client.post("/v1/chat/completions", content=big,
                           headers={"Content-Type": "application/json"})
    # Without a Content-Length (chunked), the read stops at the limit.
    chunked = client.post("/v1/chat/completions", content=iter([big[:3000], big[3000:]]),
                          headers={"Content-Type": "application/json"})
    small = client.post("/v1/chat/completions", json=_chat())
  for r in (declared, chunked):
    assert r.status_code == 413 and "--max_request_mb" in r.json()["error"]["message"]
  assert small.status_code == 200


def test_tokenizing_runs_off_the_event_loop():
  """A slow tokenization (an 18 MB prompt took 27 s) must not hold up /health."""
  started, release, tokenized = threading.Event(), threading.Event(), threading.Event()

  def slow_prompt_ids(messages=None, text=None):
    del messages, text
    started.set()
    release.wait(30)
    tokenized.set()
    return [1, 2, 3]

  with _fake_client(prompt_ids=slow_prompt_ids) as client:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      slow = pool.submit(client.post, "/v1/chat/completions", json=_chat())
      assert started.wait(30)
      health = client.get("/health")
      answered_while_tokenizing = not tokenized.is_set()
      release.set()
      assert slow.result().status_code == 200
  assert health.status_code == 200 and answered_while_tokenizing


def test_the_queue_limit_counts_choices():
  """--max_queue 4 + 2 slots hold 6 choices: prompts x n past them is refused, not queued."""
  prompts = lambda k: {"model": "m", "prompt": ["a"] * k, "max_tokens": 2}
  with _fake_client(FakeEngine(queued=3), max_queue=4) as client:
    never = client.post("/v1/completions", json={**prompts(4), "n": 2})  # 8 > 6, ever
    later = client.post("/v1/completions", json={**prompts(2), "n": 2})  # 3 queued + 4 > 6
    fits = client.post("/v1/completions", json={**prompts(1), "n": 3})  # 3 + 3 = 6
  assert never.status_code == 400 and "8 choices" in never.json()["error"]["message"]
  assert later.status_code == 429 and later.json()["error"]["type"] == "rate_limit_exceeded"
  assert fits.status_code == 200 and len(fits.json()["choices"]) == 3


def test_stream_must_be_true_or_false():
  engine = FakeEngine()
  with _fake_client(engine) as client:
    r = client.post("/v1/chat/completions", json=_chat(stream="no"))
    null = client.post("/v1/chat/completions", json=_chat(stream=None))
  assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
  assert null.status_code == 200 and null.json()["object"] == "chat.completion"


def test_the_compare_page_escapes_model_names(tmp_path):
  name = "<script>alert(1)</script>"
  with _fake_client(name=name, ballots=compare.Ballots(str(tmp_path / "v.jsonl"))) as client:
    page = client.get("/compare").text
  assert name not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", b"[" * 100_000),
    ("/compare/answers", b'["a", "b"]'),
    ("/compare/answers", json.dumps({"prompt": "hi", "models": [["a"], ["b"]]}).encode()),
    ("/compare/vote", json.dumps({"token": ["x"], "choice": "tie"}).encode()),
], ids=["nested", "answers-list", "models-lists", "vote-token-list"])
def test_malformed_bodies_are_400_not_500(tmp_path, path, body):
  with _fake_client(ballots=compare.Ballots(str(tmp_path / "v.jsonl"))) as client:
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
  assert r.status_code == 400, r.text
  assert r.json()["error"]["type"] == "invalid_request_error"


def test_the_docs_examples_decode_greedily():
  """docs/serve.md's requests (streaming ones included) set temperature 0: the quickstart model
  sampled at OpenAI's default 1.0 answers noise."""
  import re
  text = open(os.path.join(ROOT, "docs", "serve.md"), encoding="utf-8").read()
  bodies = [json.loads(b) for b in re.findall(r"-d '(\{.*?\})'", text, re.S)]
  calls = re.findall(r"\.create\(([^)]*)\)", text)
  assert any(b.get("stream") for b in bodies) and any("stream=True" in c for c in calls)
  assert all(b.get("temperature") == 0 for b in bodies), bodies
  assert all("temperature=0" in c for c in calls), calls


@pytest.mark.slow
def test_a_request_the_engine_fails_on_fails_alone(server, reference):
  """The real engine: a request whose seed jax.random.key cannot take (past the door's check)
  ends with an error; the engine thread lives on and answers the next request as before."""
  import numpy as np
  from jaxft.serving.engine import Request
  engine = server["models"]["tuned"].engine
  done = threading.Event()
  bad = Request(prompt=np.asarray([1, 2, 3], np.int32), max_new_tokens=4, temperature=1.0,
                seed=2**64, on_done=lambda finish: done.set())
  engine.submit(bad)
  assert done.wait(60) and bad.finish == "error" and "OverflowError" in bad.error
  r = server["client"].chat.completions.create(
      model="tuned", messages=[{"role": "user", "content": PROMPTS[2]}], max_tokens=8,
      temperature=0)
  assert r.choices[0].message.content.strip() == reference[2]
  assert json.loads(urllib_get(f"http://127.0.0.1:{server['port']}/health"))["status"] == "ok"


@pytest.mark.slow
def test_health_counts_finished_requests_per_model(server):
  """The base and both LoRAs share one engine; /health's counts are still each model's own."""
  health = lambda: json.loads(urllib_get(f"http://127.0.0.1:{server['port']}/health"))
  before = health()["finished"]
  server["client"].chat.completions.create(
      model="other", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=4,
      temperature=0)
  after = health()["finished"]
  assert sum(after["other"].values()) == sum(before["other"].values()) + 1
  assert after["tuned"] == before["tuned"] and after["base"] == before["base"]


@pytest.mark.slow
def test_a_non_streaming_client_that_disconnects_cancels_its_request(server):
  """The base (random weights) answers at full length: without the cancel it would decode on."""
  import http.client
  health = lambda: json.loads(urllib_get(f"http://127.0.0.1:{server['port']}/health"))
  before = health()["finished"]["base"]
  conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
  conn.request("POST", "/v1/completions", json.dumps(
      {"model": "base", "prompt": "Once", "max_tokens": 200, "temperature": 0,
       "stop": ["never-appears-0"]}), {"Content-Type": "application/json"})
  deadline = time.time() + 60
  while time.time() < deadline and health()["busy"]["base"] == 0:
    time.sleep(0.05)
  conn.sock.shutdown(socket.SHUT_RDWR)
  conn.close()
  while time.time() < deadline and health()["busy"]["base"]:
    time.sleep(0.05)
  after = health()["finished"]["base"]
  assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
  assert after.get("length", 0) == before.get("length", 0)


@pytest.mark.slow
def test_evaluate_reports_the_win_rate_of_votes(server, tmp_path):
  from jaxft import eval as evaluation
  wd = str(tmp_path / "wd")
  shutil.copytree(server["workdir"], wd)
  with open(os.path.join(wd, human_votes.VOTES), "w") as f:
    for winner in ("tuned", "tuned", "base", "tie"):
      f.write(json.dumps({"a": "base", "b": "tuned", "winner": winner}) + "\n")
  res = evaluation.evaluate(session.load_workdir_config(wd), wd, max_examples=2,
                            compare_base=False)
  (h,) = res["human_eval"]  # the tuned model first: the headline is its win rate
  assert (h["a"], h["b"], h["votes"], h["a_wins"], h["b_wins"], h["ties"]) == (
      "tuned", "base", 4, 2, 1, 1)
  report = open(os.path.join(wd, "eval_report.md")).read()
  assert "Human evaluation" in report and "| tuned | base | 4 | 2 | 1 | 1 | 0.625" in report
