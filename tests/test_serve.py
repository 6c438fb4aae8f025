"""python -m gptjax.serve as a user runs it: a subprocess on 127.0.0.1, answered through the official
``openai`` client, raw HTTP for the error shapes, 16 concurrent clients, a disconnect and SIGTERM draining.

One server (a tiny model with GPT-2's vocabulary, an API key) serves the whole module; the SIGTERM test,
last in the file, ends it."""

import concurrent.futures
import json
import signal
import socket
import threading
import time

import httpx
import jax
import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig
from gptjax import generate
from tests.served import browser_page, running_server

openai = pytest.importorskip("openai")  # the serve extra's client; part of dev

CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0)
KEY = "test-key"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tiny"
    params = gptjax.init_params(CFG, seed=3)
    gptjax.save_weights(params, CFG, path)
    return path, params


@pytest.fixture(scope="module")
def server(weights):
    with running_server(weights[0], "--max-batch", "4", "--max-queue", "32", "--api-key", KEY,
                        "--grace-seconds", "30") as started:
        yield started


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


def reference(params, prompt: str, n: int) -> str:
    tok = gptjax.get_tokenizer()
    ids = tok.encode(prompt)
    out = generate(params, CFG, np.array([ids]), n, eos_id=50256)[0, len(ids):].tolist()
    return tok.decode([t for t in out if t != 50256])


def post(server, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server[1] + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def test_completion_through_the_openai_client_equals_generate(client, weights):
    r = client.completions.create(model="tiny", prompt="Every effort moves you", max_tokens=10, temperature=0)
    assert r.choices[0].text == reference(weights[1], "Every effort moves you", 10)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 4 and r.usage.total_tokens == 4 + r.usage.completion_tokens


def test_streamed_text_joins_to_the_unstreamed_text(client):
    kw = dict(model="tiny", prompt="I had always thought", max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    whole = client.completions.create(**kw).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kw)]
    assert "".join(parts) == whole and len([p for p in parts if p]) > 1


def test_chat_streamed_and_not(client):
    messages = [{"role": "user", "content": "Tell me about the painting."}]
    kw = dict(model="tiny", messages=messages, max_tokens=8, temperature=0.7, seed=2)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)
    assert streamed == whole.choices[0].message.content


def test_echo_stop_n_and_logprobs(client, weights):
    prompt, greedy = "Every effort moves you", reference(weights[1], "Every effort moves you", 12)
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + greedy
    # A stop string ends the text before it, with finish_reason "stop".
    stop = greedy[len(greedy) // 2:][:3]
    if stop.strip():
        cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == greedy[:greedy.index(stop)] and cut.choices[0].finish_reason == "stop"
    many = client.completions.create(model="tiny", prompt=[prompt, "I had"], max_tokens=5, temperature=0.8, n=2,
                                     seed=1)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.usage.prompt_tokens == 2 * (4 + 2)
    lp = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3).choices[0]
    assert len(lp.logprobs.token_logprobs) == 4 and all(len(top) == 3 for top in lp.logprobs.top_logprobs)
    for token, chosen, top in zip(lp.logprobs.tokens, lp.logprobs.token_logprobs, lp.logprobs.top_logprobs):
        assert chosen <= 0 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the top token
        assert token in top


def test_echo_with_logprobs_scores_the_prompt(server, weights):
    """echo + logprobs: the prompt's entries first (the first null), each the model's log-prob of that token
    after the ones before (gptjax.apply), then the generated ones; max_tokens 0 scores without generating;
    streamed, the first chunk carries the prompt and its entries; lm_eval's request shape is answered."""
    tok = gptjax.get_tokenizer()
    prompt = "Every effort moves you"
    ids = tok.encode(prompt)
    logp = np.asarray(jax.nn.log_softmax(gptjax.apply(weights[1], CFG, np.array([ids])), axis=-1))[0]
    want = [None] + [float(logp[i - 1, t]) for i, t in enumerate(ids) if i > 0]
    scored = post(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0}).json()
    choice = scored["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length" and scored["usage"]["completion_tokens"] == 0
    got = choice["logprobs"]["token_logprobs"]
    assert got[0] is None and np.allclose(got[1:], want[1:], atol=1e-5)
    assert choice["logprobs"]["tokens"] == [tok.decode([t]) for t in ids]
    assert choice["logprobs"]["text_offset"] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"][1:])
    greedy = reference(weights[1], prompt, 3)
    both = post(server, "/v1/completions", {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 3,
                                            "temperature": 0}).json()["choices"][0]
    assert both["text"] == prompt + greedy and len(both["logprobs"]["token_logprobs"]) == len(ids) + 3
    assert np.allclose(both["logprobs"]["token_logprobs"][1:len(ids)], want[1:], atol=1e-5)
    # lm_eval's loglikelihood request: token-id prompts, one greedy token, its log-prob the top one.
    batch = post(server, "/v1/completions", {"prompt": [ids, ids[:2]], "echo": True, "logprobs": 1, "max_tokens": 1,
                                             "temperature": 0, "seed": 1234}).json()["choices"]
    assert [len(c["logprobs"]["token_logprobs"]) for c in batch] == [len(ids) + 1, 3]
    assert batch[0]["text"] == prompt + reference(weights[1], prompt, 1)
    last, top = batch[0]["logprobs"]["token_logprobs"][-1], batch[0]["logprobs"]["top_logprobs"][-1]
    assert last == max(top.values())
    with httpx.stream("POST", server[1] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 2, "stream": True}) as r:
        first = next(json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {"))
    assert first["choices"][0]["text"] == prompt
    assert np.allclose(first["choices"][0]["logprobs"]["token_logprobs"][1:], want[1:], atol=1e-5)


def test_tokenizer_endpoints_in_vllms_shapes(server):
    tok = gptjax.get_tokenizer()
    r = post(server, "/tokenize", {"prompt": "Hello world<|endoftext|>", "add_special_tokens": False}).json()
    assert r == {"tokens": tok.encode("Hello world<|endoftext|>", allowed_special="all"), "count": 3,
                 "max_model_len": CFG.context_length}
    assert post(server, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": "Hello world<|endoftext|>"}
    bad = post(server, "/detokenize", {"tokens": [1, CFG.vocab_size]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    info = httpx.get(server[1] + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == CFG.context_length


def test_models_health_metrics(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["context_length"] == CFG.context_length
    assert models[0].model_extra["chat_template_kwargs"] == []  # GPT-2's plain-text chat has no switches
    assert httpx.get(server[1] + "/health").json() == {"status": "ok"}
    text = httpx.get(server[1] + "/metrics").text
    for name in ("gptjax_requests_total", "gptjax_generated_tokens_total", "gptjax_queue_depth",
                 "gptjax_active_slots", "gptjax_time_to_first_token_seconds_bucket",
                 "gptjax_inter_token_latency_seconds_bucket"):
        assert name in text


def test_sixteen_concurrent_clients_get_generates_answers(client, weights):
    prompts = [f"{'Every effort moves you ' * (1 + i % 4)}{i}" for i in range(16)]
    lengths = [4 + (i * 3) % 11 for i in range(16)]

    def ask(i):
        if i % 2:  # sampled neighbours with other settings share the batch
            return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                             temperature=0.9, seed=i,
                                             extra_body={"top_k": 20} if i % 4 == 1 else None).choices[0]
        return client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i],
                                         temperature=0).choices[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, a in enumerate(answers):
        assert a.finish_reason in ("length", "stop")
        if i % 2 == 0:
            assert a.text == reference(weights[1], prompts[i], lengths[i]), i


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": 3}, "prompt"),
])
def test_bad_input_is_a_400_in_openais_shape(server, body, param):
    r = post(server, "/v1/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    if param:
        assert param in error["message"]


def test_context_overflow_names_both_numbers(server):
    r = post(server, "/v1/completions", {"prompt": [1] * 60, "max_tokens": 10})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "64" in message and "70" in message


def test_a_full_queue_is_a_429_with_retry_after(server, client):
    # 3 prompts x n=16 are 48 sequences, more than --max-queue 32 can hold: refused whole, before any runs.
    r = post(server, "/v1/completions", {"prompt": ["a", "b", "c"], "n": 16, "max_tokens": 2})
    assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full"
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def test_api_key_is_required(server):
    assert post(server, "/v1/completions", {"prompt": "x"}, key=None).status_code == 401
    assert post(server, "/v1/completions", {"prompt": "x"}, key="wrong").status_code == 401
    assert httpx.get(server[1] + "/v1/models").status_code == 401


def active_slots(server) -> float:
    text = httpx.get(server[1] + "/metrics").text
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith("gptjax_active_slots ")))


def test_a_disconnect_frees_its_slot_and_the_server_keeps_serving(server, client):
    body = {"prompt": "x", "max_tokens": 60, "stream": True, "temperature": 0}
    with httpx.stream("POST", server[1] + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        next(r.iter_lines())  # the first chunk came: the request holds a slot
    deadline = time.time() + 30
    while active_slots(server) > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert active_slots(server) == 0
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].finish_reason


def pass_on(src: socket.socket, dst: socket.socket, piece: int, pause: float) -> None:
    try:
        while data := src.recv(1 << 16):
            for i in range(0, len(data), piece):
                dst.sendall(data[i:i + piece])
                time.sleep(pause)
    except OSError:
        pass
    finally:
        src.close()
        dst.close()


@pytest.fixture(scope="module")
def slow_link(server):
    """The tiny model streams its tokens in milliseconds, so a browser would read them in one or two pieces.
    This proxy passes the server's bytes on in 256-byte pieces 20 ms apart, so a stream lasts seconds, as a
    real model's does, and the page sees it arrive piece by piece (Chrome's own network throttling, tried
    first, was not always in force for the page's fetch)."""
    port = int(server[1].rsplit(":", 1)[1])
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        while True:
            try:
                browser, _ = listener.accept()
            except OSError:  # the listener closed: the module is done
                return
            browser.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.create_connection(("127.0.0.1", port))
            threading.Thread(target=pass_on, args=(browser, upstream, 1 << 16, 0.0), daemon=True).start()
            threading.Thread(target=pass_on, args=(upstream, browser, 256, 0.02), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture(scope="module")
def page(slow_link):
    with browser_page(slow_link + "/") as page:
        page.fill("#key", KEY)
        page.dispatch_event("#key", "change")
        yield page


def test_the_page_streams_a_continuation_in_a_real_browser(page, weights):
    page.wait_for_function("document.querySelector('#model').textContent.startsWith('tiny')")
    # Count the text changes of the output box: streamed text arrives in several of them.
    page.evaluate("""() => { window.changes = 0; new MutationObserver(() => window.changes++)
                     .observe(document.querySelector('#out'), {childList: true, characterData: true, subtree: true}); }""")
    prompt = "Every effort moves you"
    page.fill("#prompt", prompt)
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "20")
    page.click("#go")
    page.wait_for_function("document.querySelector('#status').textContent === 'done'", timeout=60000)
    assert page.text_content("#out") == prompt + reference(weights[1], prompt, 20)
    assert page.evaluate("window.changes") >= 5


def test_the_pages_stop_button_ends_the_stream(page, server):
    page.fill("#prompt", "x")
    page.fill("#temperature", "1")
    page.fill("#max_tokens", "60")
    page.click("#go")
    page.click("#stop")
    page.wait_for_function("document.querySelector('#status').textContent === 'stopped'", timeout=60000)
    deadline = time.time() + 30
    while active_slots(server) > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert active_slots(server) == 0


def test_the_pages_chat_offers_no_thinking_switch_for_gpt2(page):
    page.wait_for_function("document.querySelector('#model').textContent.startsWith('tiny')")
    page.click("#mode_chat")
    assert page.is_visible("#message") and not page.is_visible("#prompt") and not page.is_visible("#thinking")
    page.fill("#max_tokens", "8")  # the stop test's 60 would overflow the tiny context
    page.fill("#key", "wrong")
    page.fill("#message", "Hello")
    page.click("#go")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('missing or wrong API key')")
    assert page.locator("#turns .turn").count() == 0 and page.input_value("#message") == "Hello"  # to send again
    page.fill("#key", KEY)
    with page.expect_request("**/v1/chat/completions") as request:
        page.click("#go")
    page.wait_for_function("document.querySelector('#status').textContent === 'done'", timeout=60000)
    assert "chat_template_kwargs" not in request.value.post_data_json
    assert page.locator("#turns .role").all_text_contents() == ["user", "assistant"]
    page.click("#mode_text")
    assert page.is_visible("#prompt") and not page.is_visible("#message")


def test_sigterm_lets_running_requests_finish_then_exits_0(server):
    proc, _ = server
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, "/v1/completions", {"prompt": "x", "max_tokens": 40, "temperature": 0})
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        r = running.result(timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert proc.wait(timeout=60) == 0


def test_a_stop_string_in_the_last_tokens_is_a_stop():
    """The engine may finish a request by its length (a burst of steps) before the text is searched for stop
    strings: a stop found then still makes the finish reason "stop" (once seen under CI's load)."""
    from gptjax.openai_api import Choice, TextTracker, finish_reason
    from gptjax.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    choice = Choice(prompt=[1], tokens=tokenizer.encode(" shaft Ash and more"), finish="length")
    tracker = TextTracker(tokenizer, [" Ash"])
    assert finish_reason(choice, TextTracker(tokenizer, [])) == "length"
    tracker.update(choice.tokens)
    assert tracker.text == " shaft" and finish_reason(choice, tracker) == "stop"
