"""`saguaro serve` live on 127.0.0.1, driven by the real `openai` client: answers equal to HF greedy
`generate` (concurrent requests too), streaming, stop strings, usage, cancellation on disconnect,
overload (429), bad requests (400/404), a failing request (500), health, models, metrics, and a
subprocess server that SIGTERM drains and stops."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from conftest import perturbed_copy, tiny_model, word_tokenizer

from saguaro.engine import AsyncEngine
from saguaro.server.app import Model
from saguaro.server.run import make_server
from saguaro.server.text import TextStream

pytestmark = pytest.mark.timeout(180)  # a hung server fails its test instead of the run
NAME = "tiny"
TEMPLATE = (
    "{% for m in messages %}{{ 'w1' if m['role'] == 'user' else 'w2' }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}w3{% endif %}"
)
SECONDS = 30  # every wait in this file is bounded


def chat_tokenizer():
    tokenizer = word_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


class Slowdown:
    """A pause before each target forward, switched on by the tests that need a request to last;
    `fail` makes the next forward raise instead."""

    def __init__(self, model):
        self.seconds, self.fail = 0.0, False
        model.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        time.sleep(self.seconds)
        if self.fail:
            self.fail = False
            raise RuntimeError("planted forward failure")


class LiveServer:
    """The app under uvicorn in a thread, on a port the OS picked."""

    def __init__(self, target, draft, shutdown_timeout: float = 5.0, **engine_options):
        self.tokenizer = chat_tokenizer()
        self.engine = None

        def load() -> Model:
            self.engine = AsyncEngine(target, draft, method="speculative", **engine_options)
            return Model(self.engine, self.tokenizer, target.config.max_position_embeddings)

        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = make_server(NAME, load, log_level="warning", shutdown_timeout=shutdown_timeout)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]}, daemon=True)
        self.thread.start()
        try:
            wait_for(lambda: request(self.url + "/health")[0] == 200, "the server to load")
        except AssertionError:
            self.stop()
            raise

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", **{"timeout": SECONDS, **kwargs})

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", **{"timeout": SECONDS, **kwargs})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(SECONDS)
        assert not self.thread.is_alive(), "the server did not stop"


def wait_for(condition, what: str, seconds: float = SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def request(url: str, body: bytes | None = None) -> tuple[int, str]:
    """Status and body of a GET (or a POST of `body`), whatever the status."""
    try:
        headers = {"Content-Type": "application/json"}
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=SECONDS) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""  # not listening (yet, or any more)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    target = tiny_model("llama", seed=0)
    return target, perturbed_copy(target, noise=0.02), Slowdown(target)


@pytest.fixture(scope="module")
def live(models):
    target, draft, _ = models
    server = LiveServer(target, draft, max_batch_size=4, max_queue=16)
    yield server
    server.stop()


def hf_greedy(target, ids: list[int], max_new_tokens: int) -> list[int]:
    out = target.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(ids) :].tolist()


def chat_ids(tokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, return_dict=True
    )["input_ids"]


def expect(tokenizer, new_ids: list[int], max_new_tokens: int) -> tuple[str, int, str]:
    """The text, completion_tokens and finish_reason an answer of `new_ids` must have."""
    finish = "length" if len(new_ids) == max_new_tokens and new_ids[-1] != 2 else "stop"
    return tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids), finish


PROMPTS = ["w5 w6 w7", "w10 w11", "w20 w21 w22 w23 w24", "w30", "w40 w41 w42", "w50 w51 w52 w53"]


def test_concurrent_requests_each_equal_hf_greedy_alone(live, models):
    target = models[0]
    tokenizer = live.tokenizer
    client = live.async_client()

    async def chat(content: str, max_tokens: int, stream: bool):
        messages = [{"role": "user", "content": content}]
        if not stream:
            answer = await client.chat.completions.create(
                model=NAME, messages=messages, max_tokens=max_tokens, temperature=0
            )
            choice = answer.choices[0]
            return choice.message.content, answer.usage.completion_tokens, choice.finish_reason
        chunks = await client.chat.completions.create(
            model=NAME,
            messages=messages,
            max_completion_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, used = "", None, None
        async for chunk in chunks:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, used, finish

    async def completion(ids: list[int], max_tokens: int, stream: bool):
        if not stream:
            answer = await client.completions.create(
                model=NAME, prompt=ids, max_tokens=max_tokens, temperature=0
            )
            return answer.choices[0].text, answer.usage.completion_tokens, answer.choices[0].finish_reason
        chunks = await client.completions.create(
            model=NAME,
            prompt=ids,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, used = "", None, None
        async for chunk in chunks:
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.text
                finish = choice.finish_reason or finish
        return text, used, finish

    async def everything():
        calls, expected = [], []
        for i, prompt in enumerate(PROMPTS):
            max_tokens = 8 + 5 * i
            if i % 3 == 2:
                ids = tokenizer(prompt).input_ids
                calls.append(completion(ids, max_tokens, stream=i % 2 == 0))
            else:
                ids = chat_ids(tokenizer, prompt)
                calls.append(chat(prompt, max_tokens, stream=i % 2 == 0))
            text, count, finish = expect(tokenizer, hf_greedy(target, ids, max_tokens), max_tokens)
            expected.append((text, count, finish))
        return await asyncio.wait_for(asyncio.gather(*calls), SECONDS), expected

    slowdown = models[2]
    slowdown.seconds = 0.01  # every request still running when the last one arrives: one batch
    try:
        answers, expected = asyncio.run(everything())
    finally:
        slowdown.seconds = 0.0
    assert answers == expected

    # The sync client, alone, agrees too.
    answer = live.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=8, temperature=0
    )
    assert answer.choices[0].message.content == expected[0][0]
    assert answer.usage.prompt_tokens == len(chat_ids(tokenizer, PROMPTS[0]))


def test_stop_strings_end_the_text_before_them(live, models):
    tokenizer = live.tokenizer
    ids = tokenizer(PROMPTS[2]).input_ids
    full = tokenizer.decode(hf_greedy(models[0], ids, 24), skip_special_tokens=True)
    words = full.split()
    assert len(words) >= 6, "the tiny model's answer is too short to cut"
    stop = " ".join(words[3:5])
    client = live.client()
    answer = client.completions.create(model=NAME, prompt=ids, max_tokens=24, temperature=0, stop=[stop])
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME, prompt=ids, max_tokens=24, temperature=0, stop=stop, stream=True
    )
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == full[: full.index(stop)]
    assert pieces[-1].choices[0].finish_reason == "stop"


def test_closing_a_stream_cancels_its_request_and_the_server_goes_on(live, models):
    slowdown = models[2]
    before = live.engine.metrics()["cancelled"]
    slowdown.seconds = 0.05
    try:
        stream = live.client().chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "w60 w61"}],
            max_tokens=400,
            temperature=0,
            stream=True,
        )
        for _, _ in zip(range(3), stream):
            pass
        stream.close()
        wait_for(lambda: live.engine.metrics()["cancelled"] > before, "the engine to cancel the request")
    finally:
        slowdown.seconds = 0.0
    wait_for(lambda: live.engine.metrics()["running"] == 0, "the batch to empty")

    # Not streamed: the client gives up (its timeout) and closes the connection.
    cancelled = live.engine.metrics()["cancelled"]
    slowdown.seconds = 0.05
    try:
        with pytest.raises(openai.APITimeoutError):
            live.client(timeout=1.0, max_retries=0).completions.create(
                model=NAME, prompt="w60 w61", max_tokens=400, temperature=0
            )
        wait_for(lambda: live.engine.metrics()["cancelled"] > cancelled, "the engine to cancel the request")
    finally:
        slowdown.seconds = 0.0
    wait_for(lambda: live.engine.metrics()["running"] == 0, "the batch to empty")
    answer = live.client().completions.create(model=NAME, prompt="w5", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens >= 1


def test_a_full_queue_answers_429_with_retry_after_and_the_server_lives(models):
    target, draft, slowdown = models
    server = LiveServer(target, draft, max_batch_size=1, max_queue=1)
    slowdown.seconds = 0.02
    try:
        client = server.async_client(max_retries=0)

        async def one(i: int):
            try:
                await client.completions.create(model=NAME, prompt=f"w{i}", max_tokens=6, temperature=0)
                return 200, None
            except openai.RateLimitError as error:
                return 429, error.response.headers.get("retry-after")

        async def burst():
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(8))), SECONDS)

        outcomes = asyncio.run(burst())
        assert (429, "1") in outcomes and (200, None) in outcomes, outcomes
        assert set(outcomes) <= {(429, "1"), (200, None)}
        slowdown.seconds = 0.0
        assert (
            server.client().completions.create(model=NAME, prompt="w7", max_tokens=3, temperature=0).choices
        )
    finally:
        slowdown.seconds = 0.0
        server.stop()


def test_bad_requests_get_openai_errors(live):
    client = live.client(max_retries=0)
    status, body = request(live.url + "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "JSON" in json.loads(body)["error"]["message"]
    status, body = request(live.url + "/v1/completions", b'{"prompt": "w1"}')
    assert status == 400 and json.loads(body)["error"]["param"] == "model"

    messages = [{"role": "user", "content": "w1"}]
    refused = {
        "n": {"n": 2},
        "logprobs": {"logprobs": True},
        "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        "response_format": {"response_format": {"type": "json_object"}},
        "presence_penalty": {"presence_penalty": 0.5},
        "temperature": {"temperature": 3.0},
        "max_tokens": {"max_tokens": 100_000},
        "frobnicate": {"extra_body": {"frobnicate": 1}},
    }
    for name, arguments in refused.items():
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=NAME, messages=messages, **arguments)
        assert name in error.value.message, (name, error.value.message)
        assert error.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=messages)
    # Neutral values of unsupported parameters ask for nothing and are accepted.
    answer = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=2, temperature=0, n=1, logprobs=False, presence_penalty=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_a_failing_request_gets_a_500_alone(live, models, monkeypatch):
    real_submit = live.engine.submit

    def submit(ids, **kwargs):
        if kwargs.get("max_new_tokens") == 13:
            raise RuntimeError("planted failure")
        return real_submit(ids, **kwargs)

    monkeypatch.setattr(live.engine, "submit", submit)
    client = live.client(max_retries=0)
    with pytest.raises(openai.InternalServerError, match="planted failure"):
        client.completions.create(model=NAME, prompt="w5", max_tokens=13, temperature=0)
    assert client.completions.create(model=NAME, prompt="w5", max_tokens=3, temperature=0).choices

    # A failure inside the engine: a 500 before the headers, an error event in a stream after them.
    models[2].fail = True
    with pytest.raises(openai.InternalServerError, match="planted forward failure"):
        client.completions.create(model=NAME, prompt="w6", max_tokens=5, temperature=0)
    models[2].fail = True
    with pytest.raises(openai.APIError, match="planted forward failure"):
        list(client.completions.create(model=NAME, prompt="w6", max_tokens=5, temperature=0, stream=True))
    assert client.completions.create(model=NAME, prompt="w5", max_tokens=3, temperature=0).choices


def test_openai_parameters_become_generate_keywords(live, monkeypatch):
    submitted = []
    real_submit = live.engine.submit

    def submit(ids, **kwargs):
        submitted.append(kwargs)
        return real_submit(ids, **kwargs)

    monkeypatch.setattr(live.engine, "submit", submit)
    client = live.client()
    client.completions.create(
        model=NAME, prompt="w9", max_tokens=5, temperature=0.7, top_p=0.9, seed=7, stop="w1"
    )
    client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "w9"}], max_completion_tokens=4, temperature=0
    )
    client.completions.create(model=NAME, prompt="w9", max_tokens=3)
    sampled, greedy, default = submitted
    assert sampled == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 0,
        "seed": 7,
        "stop_strings": ["w1"],
        "tokenizer": live.tokenizer,
    }
    assert greedy == {"max_new_tokens": 4, "do_sample": False}
    assert default == {"max_new_tokens": 3, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}


class ByteTokenizer:
    """Each id is one byte of UTF-8: a character of several bytes spans several tokens."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_text_never_takes_anything_back():
    answer = "héllo wörld 🌵 ends here STOP and more"
    ids = list(answer.encode())
    for stops, expected in (
        ([], answer),
        (["STOP"], answer[: answer.index("STOP")]),
        (["🌵"], "héllo wörld "),
    ):
        text = TextStream(ByteTokenizer(), stops)
        pieces = [text.push([i]) for i in ids] + [text.finish()]
        assert "".join(pieces) == expected
        assert not any("\ufffd" in piece for piece in pieces)  # half a character is never sent
        assert text.stopped == bool(stops)


def test_health_models_and_metrics(live):
    assert request(live.url + "/health") == (200, '{"status":"ok"}')
    assert [m.id for m in live.client().models.list()] == [NAME]
    live.client().completions.create(model=NAME, prompt="w3 w4", max_tokens=3, temperature=0)
    status, text = request(live.url + "/metrics")
    assert status == 200
    for metric in (
        'saguaro_http_requests_total{endpoint="completions",status="200"}',
        "saguaro_time_to_first_token_seconds_count",
        "saguaro_queue_depth",
        "saguaro_running_requests",
        "saguaro_generated_tokens_total",
        "saguaro_prefix_reused_tokens_total",
        "saguaro_acceptance_rate",
    ):
        assert metric in text, metric


def test_health_is_503_until_the_models_are_loaded():
    loaded = threading.Event()

    def load():
        loaded.wait(SECONDS)
        raise RuntimeError("no models in this test")

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    server = make_server(NAME, load, log_level="critical")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: request(url + "/health")[0] == 503, "the server to listen")
        assert json.loads(request(url + "/health")[1]) == {"status": "loading"}
        status, body = request(url + "/v1/completions", b'{"model": "tiny", "prompt": "w1"}')
        assert status == 503 and json.loads(body)["error"]["message"] == "The model is still loading"
    finally:
        loaded.set()
        thread.join(SECONDS)  # a failed load stops the server
    assert not thread.is_alive()


def test_a_drain_refuses_new_work_finishes_what_runs_cancels_past_the_timeout_then_stops(models):
    target, draft, slowdown = models
    server = LiveServer(target, draft, shutdown_timeout=3.0)
    slowdown.seconds = 0.1
    try:
        client = server.client(max_retries=0)
        # Prompts whose greedy answers run past 400 tokens without EOS (checked against HF's).
        short = client.completions.create(model=NAME, prompt="w5", max_tokens=6, temperature=0, stream=True)
        long = client.completions.create(
            model=NAME, prompt="w60 w61", max_tokens=400, temperature=0, stream=True
        )
        short, long = iter(short), iter(long)
        next(short), next(long)
        started = time.monotonic()
        server.server.request_drain()  # what SIGTERM does
        wait_for(lambda: request(server.url + "/health")[0] == 503, "the drain to begin")
        status, body = request(server.url + "/v1/completions", b'{"model": "tiny", "prompt": "w1"}')
        assert status == 503 and "shutting down" in json.loads(body)["error"]["message"]
        assert [c.choices[0].finish_reason for c in short][-1] == "length"
        with pytest.raises(openai.APIError, match="shut down before the answer was complete"):
            list(long)
        server.thread.join(SECONDS)
        assert not server.thread.is_alive()
        assert time.monotonic() - started < 3.0 + 5.0  # the drain's timeout, then the last writes
    finally:
        slowdown.seconds = 0.0
        server.stop()


def test_sigterm_drains_then_exits(tmp_path):
    target = tiny_model("llama", seed=0)
    target.save_pretrained(tmp_path / "target")
    chat_tokenizer().save_pretrained(tmp_path / "target")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "saguaro.cli", "serve", "--target", str(tmp_path / "target")]
    command += ["--dtype", "float32", "--method", "autoregressive", "--port", str(port)]
    process = subprocess.Popen(command, env={**os.environ, "SAGUARO_CACHE_DIR": "off"})
    try:
        wait_for(
            lambda: process.poll() is not None or request(url + "/health")[0] == 200,
            "the server",
            seconds=120,
        )
        assert process.poll() is None, "saguaro serve exited before it was ready"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=SECONDS, max_retries=0)
        stream = client.completions.create(
            model="target", prompt="w5 w6", max_tokens=20, temperature=0, stream=True
        )
        next(iter(stream))
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: request(url + "/health")[0] in (0, 503), "the drain to begin")
        status, _ = request(url + "/v1/completions", b'{"model": "target", "prompt": "w1"}')
        assert status in (0, 503)  # refused: draining, or already closed
        assert [chunk.choices[0].finish_reason for chunk in stream][-1] in ("stop", "length")
        assert process.wait(timeout=30) == 0  # issue 30: SIGTERM stops the server within 30 s
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(SECONDS)
