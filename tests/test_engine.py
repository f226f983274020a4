"""The engine with the real SmolLM2 model: the seed's steps 3-6 end to end, bad input, cache failures."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lmcached.client import KVClient

from .conftest import CPU, INSTANCE, start_process, stop_serve

PROMPT = "Explain the significance of KV cache in language models."
MODEL = "SmolLM2-135M-Instruct"

pytestmark = pytest.mark.slow


class Stack:
    """`lmcached serve --engine` in a subprocess: the controller, the worker and the engine."""

    def __init__(self) -> None:
        self.process = start_process(
            [
                sys.executable,
                "-m",
                "lmcached",
                "serve",
                "--engine",
                "--port",
                "0",
                "--monitor-port",
                "0",
                "--worker-port",
                "0",
                "--engine-port",
                "0",
            ],
            "lmcached engine ready ",
            timeout=300,
        )
        serve_line = next(line for line in self.process.output if line.startswith("lmcached ready "))
        self.ports = json.loads(serve_line[len("lmcached ready ") :])
        self.engine = f"http://127.0.0.1:{self.process.ports['http']}"
        self.controller = f"http://127.0.0.1:{self.ports['http']}"
        self.data = f"127.0.0.1:{self.ports['data']}"


def post(url: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_event(stack: Stack, event_id: str) -> dict[str, Any]:
    import time

    for _ in range(600):
        _, event = post(stack.controller + "/check_finish", {"event_id": event_id})
        if event["status"] in ("finished", "failed"):
            return event
        time.sleep(0.05)
    raise AssertionError("event never finished")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    running = Stack()
    yield running
    stop_serve(running.process)


def complete(stack: Stack, **extra: Any) -> dict[str, Any]:
    status, body = post(stack.engine + "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, **extra})
    assert status == 200, body
    return body


def test_seed_steps_3_to_6_with_the_real_model(stack: Stack) -> None:
    # Step 3: a completion; the engine offloads the prompt's KV after prefill.
    first = complete(stack)
    assert first["object"] == "text_completion" and first["choices"][0]["text"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # Step 4: tokenize.
    status, tokenized = post(stack.engine + "/tokenize", {"model": MODEL, "prompt": PROMPT})
    assert status == 200 and tokenized["token_strs"] is None and tokenized["max_model_len"] == 8192
    tokens, count = tokenized["tokens"], tokenized["count"]
    assert count == len(tokens) == first["usage"]["prompt_tokens"]
    # The controller knows where the prompt's KV lives.
    _, lookup = post(stack.controller + "/lookup", {"tokens": tokens})
    assert lookup["layout_info"] == {INSTANCE: [CPU, count]}
    # Step 5: compress it.
    _, answer = post(stack.controller + "/compress", {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": tokens})
    assert answer["num_tokens"] == count
    assert wait_event(stack, answer["event_id"])["status"] == "finished"
    # The same completion is served from the compressed cache, with the same greedy text.
    again = complete(stack)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= count - 1
    assert again["choices"][0]["text"] == first["choices"][0]["text"]
    # Step 6: decompress it.
    _, answer = post(stack.controller + "/decompress", {"instance_id": INSTANCE, "method": "cachegen", "location": CPU, "tokens": tokens})
    assert answer["num_tokens"] == count
    assert wait_event(stack, answer["event_id"])["status"] == "finished"


def test_prompt_as_token_ids_and_models_list(stack: Stack) -> None:
    _, tokenized = post(stack.engine + "/tokenize", {"prompt": "Hello there, how are you today?"})
    body = complete(stack, prompt=tokenized["tokens"], max_tokens=3)
    assert body["usage"]["prompt_tokens"] == tokenized["count"]
    with urllib.request.urlopen(stack.engine + "/v1/models", timeout=30) as response:
        assert json.loads(response.read())["data"][0]["id"] == MODEL


def test_streaming_sends_events_then_done(stack: Stack) -> None:
    request = urllib.request.Request(
        stack.engine + "/v1/completions",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}).encode(),
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [line[len(b"data: ") :] for line in response.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 4
    assert "".join(c["choices"][0]["text"] for c in chunks) == complete(stack, max_tokens=4)["choices"][0]["text"]


def test_stop_strings_and_seeded_sampling(stack: Stack) -> None:
    body = complete(stack, max_tokens=20, stop=["cache"])
    assert "cache" not in body["choices"][0]["text"]
    a = complete(stack, temperature=0.9, top_p=0.9, seed=7, max_tokens=8)
    b = complete(stack, temperature=0.9, top_p=0.9, seed=7, max_tokens=8)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-4", "prompt": "hi"}, 404, MODEL),
        ({"model": MODEL}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": [1, 2, -5]}, 400, "token ids"),
        ({"prompt": list(range(100, 9000))}, 400, "context"),
        (b"{broken", 400, "JSON"),
    ],
)
def test_bad_requests_are_4xx(stack: Stack, body: Any, status: int, needle: str) -> None:
    got, answer = post(stack.engine + "/v1/completions", body)
    assert got == status and needle in answer["detail"]


@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "n", 2),
        ("/v1/completions", "echo", True),
        ("/v1/completions", "logprobs", 3),
        ("/v1/chat/completions", "logprobs", True),
        ("/v1/chat/completions", "n", True),
        ("/v1/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ],
)
def test_what_the_engine_does_not_implement_is_refused_by_name(stack: Stack, path: str, field: str, value: Any) -> None:
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    got, answer = post(stack.engine + path, {**body, field: value})
    assert got == 400 and answer["detail"].startswith(f"{field} is not supported by this engine"), answer
    got, _ = post(stack.engine + path, {**body, "n": 1, "echo": False, "logprobs": None, "max_tokens": 1})  # the defaults pass
    assert got == 200


def test_chat_completions_through_the_openai_sdk_with_the_chat_template_and_cache_reuse(stack: Stack) -> None:
    """The official OpenAI client: a conversation is laid out by the model's chat template, streamed or not, and
    its earlier turns come back from lmcached as cached tokens on the next request."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=stack.engine + "/v1", api_key="unused")
    question = [{"role": "user", "content": "What does a KV cache store in a transformer? Answer in one sentence, " * 20}]
    first = client.chat.completions.create(model=MODEL, messages=question, max_tokens=12, temperature=0)
    answer = first.choices[0].message
    assert answer.role == "assistant" and answer.content and first.choices[0].finish_reason in ("length", "stop")
    assert first.object == "chat.completion" and first.usage.prompt_tokens > 256

    # SmolLM2's chat template: its default system turn, the user turn, then the assistant's cue.
    laid_out = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{question[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    )
    _, tokenized = post(stack.engine + "/tokenize", {"prompt": laid_out})
    assert first.usage.prompt_tokens == tokenized["count"]

    stream = client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.content  # greedy: the same answer, now from the cached prefix
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == first.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 256  # the first request's chunks, reused

    follow_up = [*question, {"role": "assistant", "content": answer.content}, {"role": "user", "content": "And why?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, max_completion_tokens=5, temperature=0)
    assert second.usage.completion_tokens <= 5 and second.usage.prompt_tokens_details.cached_tokens >= 256


def test_concurrent_requests_are_queued_not_crashed(stack: Stack) -> None:
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(complete(stack, prompt=f"Count to {i}:", max_tokens=5))) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 4 and all(r["choices"][0]["finish_reason"] == "length" for r in results)


def test_a_corrupt_cached_chunk_falls_back_to_computing(stack: Stack) -> None:
    _, tokenized = post(stack.engine + "/tokenize", {"prompt": "A prompt whose cache was poisoned."})
    with KVClient(stack.data) as client:  # the right keys, but KV of the wrong shape
        client.store(tokenized["tokens"], torch.zeros(2, 3, tokenized["count"], 8, dtype=torch.float16))
    body = complete(stack, prompt="A prompt whose cache was poisoned.", max_tokens=3)
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_engine_without_a_reachable_worker_still_answers() -> None:
    engine = start_process(
        [sys.executable, "-m", "lmcached", "engine", "--port", "0", "--worker", "127.0.0.1:9"], "lmcached engine ready ", timeout=300
    )
    try:
        status, body = post(
            f"http://127.0.0.1:{engine.ports['http']}/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        )
        assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        stop_serve(engine)


def test_the_workload_benchs_users_through_the_openai_sdk(stack: Stack) -> None:
    """bench workload's client (multi-round chat and long-document QA) against a real OpenAI-compatible server:
    every request answered, each under its user (or document) and round, the document QA's rounds in
    document_orders(). The runs against vLLM are the bench's."""
    import asyncio

    from lmcached.bench.workload import Outcome, Shape, document_orders, run_users

    for kind in ("chat", "docqa"):
        shape = Shape(users=3, rounds=2, rate=20.0, system_chars=200, context_chars=300, kind=kind)
        outcome = Outcome(kind)
        asyncio.run(run_users([stack.engine], MODEL, shape, outcome))
        assert outcome.failures == [] and len(outcome.requests) == 6, outcome.failures
        assert sorted((u, r) for u, r, _, _ in outcome.requests) == [(u, r) for u in range(3) for r in range(2)]
        assert all(ttft > 0 and tokens > 0 for *_, ttft, tokens in outcome.requests)
        assert set(outcome.answers) == {(u, r) for u in range(3) for r in range(2)} and all(outcome.answers.values())
        if kind == "docqa":  # sent in the rounds' document order: the second round's goes out after the first's
            second = [u for u, r, *_ in sorted(outcome.requests, key=lambda q: outcome.sent_at[outcome.requests.index(q)]) if r == 1]
            assert second == document_orders(3, 2)[1]
