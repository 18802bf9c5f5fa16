"""`qcompile serve`: the OpenAI-compatible server, driven by the official `openai` client (streaming and
not) and by plain httpx for the error cases, against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

import qcompile
from qcompile.cli import main
from qcompile.run.batching import engine_for
from qcompile.run.generation import SamplingParams, generate
from qcompile.run.tokenizer import Tokenizer
from qcompile.serve.app import create_app
from qcompile.serve.server import BackgroundServer

QUEUE_SIZE = 4
MAX_BATCH = 4


@pytest.fixture(scope="module")
def loaded(text_library, text_checkpoint):
    return qcompile.load(text_library, weights=text_checkpoint), Tokenizer.from_directory(text_checkpoint)


def greedy(model, tokenizer, prompt_ids, max_tokens, **fields):
    """What generation gives for this prompt, run directly (before the server owns the model)."""
    chunks = list(generate(model, tokenizer, prompt_ids, SamplingParams(max_tokens=max_tokens, **fields)))
    return "".join(c.text for c in chunks), sum(len(c.token_ids) for c in chunks), chunks[-1].finish_reason


PROMPT = "The quick brown fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def expected(loaded):
    """Reference outputs computed directly from the loaded model, before a server takes it over."""
    model, tok = loaded
    chat_ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True))
    return {"completion": greedy(model, tok, tok.encode(PROMPT), 12),
            "chat": greedy(model, tok, chat_ids, 10), "chat_prompt_tokens": len(chat_ids)}


@pytest.fixture(scope="module")
def server(loaded, expected):
    model, tok = loaded
    app = create_app(GatedEngine(engine_for(model, max_batch=MAX_BATCH)), tok, model_name="tiny",
                     queue_size=QUEUE_SIZE)
    with BackgroundServer(app) as url:
        yield url, app.state.worker


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=30)


def health(url):
    response = httpx.get(url + "/health", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").max_model_len == 256
    state = health(server[0])
    assert state["status"] == "ok" and state["model"] == "tiny" and state["queue"]["queue_size"] == QUEUE_SIZE
    assert state["batch"]["sequences"] == 0 and state["batch"]["max_batch"] == server[1].engine.max_batch


def test_completion_is_what_generation_gives(client, loaded, expected):
    text, tokens, finish = expected["completion"]
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    assert result.object == "text_completion" and result.model == "tiny"
    assert (result.choices[0].text, result.choices[0].finish_reason) == (text, finish) and finish == "length"
    prompt_tokens = len(loaded[1].encode(PROMPT))
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        prompt_tokens, tokens, prompt_tokens + tokens)
    # The same prompt given as token ids.
    by_ids = client.completions.create(model="tiny", prompt=loaded[1].encode(PROMPT), max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == text


def test_chat_streaming_equals_non_streaming(client, expected):
    text, tokens, finish = expected["chat"]
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (text, finish)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (expected["chat_prompt_tokens"], tokens)

    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choices, last = chunks
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == text
    assert [c.choices[0].finish_reason for c in with_choices].count(finish) == 1
    assert with_choices[-1].choices[0].finish_reason == finish
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        expected["chat_prompt_tokens"], tokens)


def test_concurrent_streams_each_get_their_own_answer(client, server, loaded):
    """Five streaming requests at once (different prompts and lengths) share the batch's steps: each
    streams what generation gives it alone, greedy; the batch is empty after."""
    model, tok = loaded
    prompts = [(f"{PROMPT} {'and ' * i}jumps", 4 + 2 * i) for i in range(QUEUE_SIZE + 1)]
    alone = [greedy(model, tok, tok.encode(text), n)[0] for text, n in prompts]  # the server idles meanwhile
    before = health(server[0])["queue"]["completed"]
    texts: dict[int, str] = {}

    def stream(index):
        text, max_tokens = prompts[index]
        chunks = client.completions.create(model="tiny", prompt=text, max_tokens=max_tokens, temperature=0,
                                           stream=True)
        texts[index] = "".join(c.choices[0].text for c in chunks)

    engine = server[1].engine
    engine.gate.clear()  # the first step waits until every request has arrived: they must share steps
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    wait_for(lambda: sum(server[1].scheduler.counts()) == len(prompts))
    engine.gate.set()
    for t in threads:
        t.join(60)
    assert [texts.get(i) for i in range(len(prompts))] == alone
    assert engine.widest == engine.max_batch == MAX_BATCH  # they shared steps
    state = health(server[0])
    assert state["queue"]["completed"] - before == len(prompts) and state["batch"]["sequences"] == 0


def test_completion_stream_wire_format(server, expected):
    """The raw event stream: `data: {json}` events, a finish_reason on the last chunk, `data: [DONE]`."""
    text, _, finish = expected["completion"]
    with httpx.stream("POST", server[0] + "/v1/completions", timeout=30,
                      json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    bodies = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(b["choices"][0]["text"] for b in bodies) == text
    assert bodies[-1]["choices"][0]["finish_reason"] == finish
    assert all(b["choices"][0]["finish_reason"] is None for b in bodies[:-1])


def test_stop_string_seed_and_extras(client, expected):
    text, _, _ = expected["completion"]
    stop = text[4:6]  # a piece of the greedy continuation: the answer ends right before it
    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert result.choices[0].finish_reason == "stop" and result.choices[0].text == text[:text.index(stop)]

    def sampled(seed, **extras):
        return client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body=extras).choices[0].text

    assert sampled(7, min_p=0.01, repetition_penalty=1.1) == sampled(7, min_p=0.01, repetition_penalty=1.1)
    # The extra fields reach the sampler: top_k 1 (or min_p 1) leaves only the most likely token.
    assert sampled(7, top_k=1) == text and sampled(8, min_p=1.0) == text


def error_of(response, status=400):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_REQUESTS = [  # (path, raw body, the field the error names)
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', None),
    ("/v1/completions", b'["not", "an", "object"]', None),
    ("/v1/completions", b'{"model": "gpt-4", "prompt": "hi"}', "model"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": -3}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": "8"}', "max_tokens"),
    ("/v1/completions", b'{"prompt": "' + b"hello " * 300 + b'"}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": 256}', "max_tokens"),
    ("/v1/completions", b'{"prompt": ""}', None),
    ("/v1/completions", b'{"prompt": [1, 2, 151936]}', None),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', "prompt"),
    ("/v1/completions", b'{"prompt": "hi", "n": 2}', "n"),
    ("/v1/completions", b'{"prompt": "hi", "stop": 5}', "stop"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": 1.5}', None),
    ("/v1/completions", b'{"max_tokens": 4}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ["hi"]}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
    ("/v1/chat/completions", b'{"messages": []}', "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
     "temperature"),
]


@pytest.mark.parametrize("path,body,param", BAD_REQUESTS)
def test_bad_requests_are_400_with_an_openai_error(server, path, body, param):
    error = error_of(httpx.post(server[0] + path, content=body, headers={"content-type": "application/json"}))
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_errors_through_the_openai_client_and_routes(client, server):
    with pytest.raises(openai.BadRequestError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hello " * 300, stream=True)
    assert error_of(httpx.get(server[0] + "/v1/nothing"), 404)["type"] == "not_found_error"
    assert error_of(httpx.get(server[0] + "/v1/completions"), 405)
    assert error_of(httpx.get(server[0] + "/v1/models/other"), 404)["code"] == "model_not_found"
    assert health(server[0])["status"] == "ok"


class GatedEngine:
    """The real model's engine, but each step waits for `gate` and takes `step_seconds` more (requests
    that hold the model as long as a test needs); `widest`: the most sequences one step has fed."""

    def __init__(self, engine, step_seconds=0.0):
        self._engine, self.step_seconds, self.widest = engine, step_seconds, 0
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def step(self, work):
        self.gate.wait(30)
        time.sleep(self.step_seconds)
        self.widest = max(self.widest, len(work))
        return self._engine.step(work)


@pytest.fixture
def gated_server(loaded, server):
    """A second server on the same loaded model (the first one idles meanwhile): one sequence at a time,
    queue of 1."""
    model, tok = loaded
    gated = GatedEngine(engine_for(model, max_batch=1))
    app = create_app(gated, tok, model_name="tiny", queue_size=1)
    with BackgroundServer(app) as url:
        yield url, app.state.worker, gated


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_answers_429_with_retry_after(gated_server):
    url, worker, gated = gated_server
    gated.gate.clear()  # the first request holds the model until the gate opens
    results = {}

    def post(key):
        results[key] = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)

    threads = [threading.Thread(target=post, args=(key,)) for key in ("running", "waiting")]
    threads[0].start()
    wait_for(lambda: worker.snapshot()["running"] == 1)
    threads[1].start()
    wait_for(lambda: worker.snapshot()["waiting"] == 1)
    refused = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
    error = error_of(refused, 429)
    assert error["type"] == "rate_limit_error" and int(refused.headers["retry-after"]) >= 1
    gated.gate.set()
    for t in threads:
        t.join(30)
    assert [results[k].status_code for k in ("running", "waiting")] == [200, 200]
    assert worker.snapshot() | {"rejected": 1, "completed": 2} == worker.snapshot()


def test_a_client_that_leaves_while_waiting_is_skipped(gated_server):
    url, worker, gated = gated_server
    gated.gate.clear()
    running = threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                               kwargs={"json": {"prompt": "hi", "max_tokens": 2}, "timeout": 30})
    running.start()
    wait_for(lambda: worker.snapshot()["running"] == 1)
    with pytest.raises(httpx.ReadTimeout):  # waits behind the running one, then gives up
        httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=httpx.Timeout(30, read=0.3))
    gated.gate.set()
    running.join(30)
    wait_for(lambda: worker.snapshot()["waiting"] == 0 and worker.snapshot()["running"] == 0)
    assert (worker.counts.completed, worker.counts.cancelled) == (1, 1)  # it never reached the model


def test_disconnect_frees_the_model(gated_server):
    """A client that leaves mid-stream (or mid-wait for a whole answer) cancels its generation at once:
    the next request is served promptly, not after the ~10 s the abandoned one would still have taken."""
    url, worker, gated = gated_server
    gated.step_seconds = 0.05  # 200 tokens: 10 s
    long = {"prompt": "hi", "max_tokens": 200, "temperature": 0}
    with httpx.stream("POST", url + "/v1/completions", json={**long, "stream": True}, timeout=30) as response:
        next(response.iter_lines())  # generation has started
    wait_for(lambda: worker.snapshot()["cancelled"] == 1, timeout=2)
    with pytest.raises(httpx.ReadTimeout):  # a whole-answer client that gives up
        httpx.post(url + "/v1/completions", json=long, timeout=httpx.Timeout(30, read=0.5))
    wait_for(lambda: worker.snapshot()["cancelled"] == 2, timeout=2)
    start = time.monotonic()
    answer = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert answer.status_code == 200 and time.monotonic() - start < 2
    assert health(url)["queue"]["running"] == 0


def test_a_request_beyond_the_kv_budget_is_a_400(loaded, server):
    """A server whose KV budget holds 2 pages (2 x 16 tokens): a request that could never fit is refused
    up front naming max_tokens; one that fits is answered."""
    model, tok = loaded
    page_bytes = engine_for(model, max_batch=1).page_bytes["full"]  # 16 tokens of every layer
    engine = engine_for(model, max_batch=2, kv_budget_bytes=2 * page_bytes)
    assert engine.snapshot()["kv_pages"] == 2 and engine.page_tokens == 16
    with BackgroundServer(create_app(engine, tok, model_name="tiny")) as url:
        error = error_of(httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 40}, timeout=30))
        assert error["param"] == "max_tokens" and "--kv-budget" in error["message"]
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 20},
                          timeout=30).status_code == 200


def test_load_every_request_answered_or_refused(client, server):
    """16 clients x 3 requests (half of them streaming) against a queue of 4: each answered (200) or
    refused with 429; none lost, none 5xx; the counts agree with the worker's; healthy after."""
    before = server[1].snapshot()
    outcomes: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def one_client(index):
        start.wait()
        for request in range(3):
            try:
                if (index + request) % 2:
                    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                    finish = "ok"
                else:
                    result = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
                    text, finish = result.choices[0].text, "ok"
                outcome = finish if isinstance(text, str) else "bad"
            except openai.RateLimitError:
                outcome = "429"
            except Exception as e:  # noqa: BLE001 -- anything else is a failure this test reports
                outcome = f"error: {e!r}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    counts = {k: outcomes.count(k) for k in set(outcomes)}
    print(f"load: 16 clients x 3 requests -> {counts}")
    assert len(outcomes) == 48 and set(counts) <= {"ok", "429"} and counts.get("ok", 0) >= 1, counts
    after = health(server[0])["queue"]
    assert after["completed"] - before["completed"] == counts["ok"]
    assert after["rejected"] - before["rejected"] == counts.get("429", 0)
    assert (after["waiting"], after["running"], after["failed"]) == (0, 0, 0)


def test_cli_user_errors(capsys, text_library, debug_checkpoint, text_checkpoint):
    def user_error(needle, *argv):
        code = main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("qcompile: error: ") and err.count("\n") == 1, err
        assert needle in err, err

    user_error("tokenizer", "serve", text_library, "--weights", debug_checkpoint)  # no tokenizer files
    user_error("--port", "serve", text_library, "--weights", text_checkpoint, "--port", "70000")
    user_error("--queue-size", "serve", text_library, "--weights", text_checkpoint, "--queue-size", "-1")
    user_error("--max-batch", "serve", text_library, "--weights", text_checkpoint, "--max-batch", "0")
    user_error("--kv-budget", "serve", text_library, "--weights", text_checkpoint, "--kv-budget", "lots")
    user_error("not a library directory", "serve", "qwen2-debug", "--weights", text_checkpoint)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        user_error("cannot listen", "serve", text_library, "--weights", text_checkpoint, "--port",
                   taken.getsockname()[1])


def test_cli_serves_until_interrupted(text_library, text_checkpoint):
    """The real command in its own process: it prints its address, answers the openai client, and stops
    cleanly (status 0) on Ctrl-C."""
    process = subprocess.Popen([sys.executable, "-m", "qcompile", "serve", str(text_library), "--weights",
                                str(text_checkpoint), "--port", "0", "--model-name", "cli-model"],
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1 ", line)
        assert url, line  # else the line says why it did not start
        client = openai.OpenAI(base_url=url.group(1) + "/v1", api_key="unused", max_retries=0, timeout=30)
        result = client.completions.create(model="cli-model", prompt=PROMPT, max_tokens=3, temperature=0)
        assert result.model == "cli-model" and result.usage.completion_tokens == 3
        process.send_signal(signal.SIGINT)
        assert process.wait(20) == 0
        assert process.stderr.read().strip().endswith("qcompile serve: stopped")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
