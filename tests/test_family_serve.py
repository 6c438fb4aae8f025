"""A Qwen3 model folder (weights as transformers writes them, Qwen3-style tokenizer files with the published
chat template) served as a user serves it: ``python -m gptjax.serve --weights FOLDER``, asked through the
``openai`` client. The chat is rendered with the model's template and ends at its end-of-turn ids; the answers
are what ``gptjax.generate`` continues the rendered prompt with. ``python -m gptjax.generate`` takes the
folder too. The page at ``/`` holds a conversation through the same endpoint, with Qwen3's thinking switch."""

import json

import httpx
import numpy as np
import pytest

import gptjax
from gptjax.chat import model_text
from gptjax.cli.generate import main as generate_main
from gptjax.qwen3 import Qwen3Config
from tests.family_files import write_qwen_tokenizer
from tests.served import browser_page, running_server

openai = pytest.importorskip("openai")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who painted the picture?"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3-tiny")
    vocab = write_qwen_tokenizer(folder)
    cfg = Qwen3Config(vocab_size=vocab, context_length=128, emb_dim=64, n_heads=4, n_kv_groups=2, head_dim=16,
                      n_layers=2, hidden_dim=96, tie_embeddings=False)  # tied, a random model repeats its input
    params = gptjax.init_params(cfg, seed=5)
    gptjax.save_weights(params, cfg, folder, format="hf", overwrite=True)
    # A random model rarely ends its turn: make the token its greedy answer reaches a few steps in one of the
    # folder's end-of-sequence ids, so that answers stop there (generation_config.json, as published models list
    # theirs).
    tokenizer, chat = model_text(cfg, folder)
    prompt = tokenizer.encode(chat.render(MESSAGES, enable_thinking=False), allowed_special="all")
    new = gptjax.generate(params, cfg, np.asarray([prompt]), 24)[0, len(prompt):].tolist()
    end = next(t for i, t in enumerate(new) if i >= 3 and t not in new[:i])
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"].append(end)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def server(folder):
    with running_server(folder, "--max-batch", "1") as (_, url):
        yield url


@pytest.fixture(scope="module")
def page(server):
    with browser_page(server + "/") as page:
        yield page


def reference(folder, max_tokens, **template_kwargs):
    """What gptjax.generate continues the rendered chat with, cut at the first end-of-turn id."""
    params, cfg = gptjax.load_weights(folder)
    tokenizer, chat = model_text(cfg, folder)
    prompt = tokenizer.encode(chat.render(MESSAGES, **template_kwargs), allowed_special="all")
    new = gptjax.generate(params, cfg, np.asarray([prompt]), max_tokens, eos_id=chat.stop_ids)[0, len(prompt):]
    stopped = len(new) and new[-1] in chat.stop_ids
    return tokenizer.decode(new[:-1] if stopped else new), "stop" if stopped else "length"


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_uses_the_models_template_and_stops(folder, server, thinking):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    kwargs = dict(model=folder.name, messages=MESSAGES, max_tokens=24, temperature=0,
                  extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    answer = client.chat.completions.create(**kwargs).choices[0]
    text, reason = reference(folder, 24, enable_thinking=thinking)
    assert (answer.message.content, answer.finish_reason) == (text, reason)
    assert reason == "stop" or thinking  # the fixture's end id stops the answer without thinking
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == text


def test_the_pages_chat_is_the_apis_in_a_real_browser(folder, server, page):
    assert httpx.get(server + "/v1/models").json()["data"][0]["chat_template_kwargs"] == ["enable_thinking"]
    page.wait_for_function(f"document.querySelector('#model').textContent.startsWith({json.dumps(folder.name)})")
    assert not page.is_visible("#thinking")  # a chat switch: not shown to continue text
    page.click("#mode_chat")
    assert page.is_visible("#thinking") and page.is_checked("#thinking")  # the template's own default
    page.uncheck("#thinking")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "16")
    conversation = []
    for text in ("Who painted the picture?", "Why?"):  # the second turn carries the first
        page.fill("#message", text)
        with page.expect_request("**/v1/chat/completions") as request:
            page.click("#go")
        page.wait_for_function("document.querySelector('#status').textContent === 'done'", timeout=60000)
        conversation.append({"role": "user", "content": text})
        body = request.value.post_data_json
        assert body["messages"] == conversation and body["chat_template_kwargs"] == {"enable_thinking": False}
        answer = httpx.post(server + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
        reply = page.locator("#turns .assistant .content").last.text_content()
        assert reply and reply == answer["choices"][0]["message"]["content"]
        conversation.append({"role": "assistant", "content": reply})
    assert page.locator("#turns .role").all_text_contents() == ["user", "assistant"] * 2
    page.click("#new_chat")
    assert page.locator("#turns .turn").count() == 0


def test_tokenizer_endpoints_are_the_models(folder, server):
    _, cfg = gptjax.load_weights(folder)
    tokenizer, _ = model_text(cfg, folder)
    info = httpx.get(server + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["vocab_size"] == cfg.vocab_size
    tokens = httpx.post(server + "/tokenize", json={"prompt": "<|im_start|>user"}).json()["tokens"]
    assert tokens == tokenizer.encode("<|im_start|>user", allowed_special="all")
    assert tokenizer.decode([tokens[0]]) == "<|im_start|>"


def test_generate_command_takes_the_folder(folder, capsys):
    prompt = "I HAD always thought"
    assert generate_main(["--weights", str(folder), "--prompt", prompt, "--temperature", "0",
                          "--max-new-tokens", "8", "--eos"]) == 0
    params, cfg = gptjax.load_weights(folder)
    tokenizer, chat = model_text(cfg, folder)
    ids = tokenizer.encode(prompt)
    new = gptjax.generate(params, cfg, np.asarray([ids]), 8, eos_id=chat.stop_ids)[0]
    if new[-1] in chat.stop_ids:
        new = new[:-1]
    assert capsys.readouterr().out == tokenizer.decode(new) + "\n"


def test_a_family_model_without_tokenizer_files_is_a_one_line_error(folder, tmp_path, capsys):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    assert generate_main(["--weights", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--weights {tmp_path}: a qwen3 model needs its tokenizer files" in err


def test_template_refusals_are_400s(server):
    body = {"messages": MESSAGES, "max_tokens": 2, "chat_template_kwargs": {"messages": []}}
    reply = httpx.post(server + "/v1/chat/completions", json=body)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"].startswith("the model's chat template refused the messages")
    reply = httpx.post(server + "/v1/chat/completions", json={**body, "chat_template_kwargs": "thinking"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "chat_template_kwargs"


def test_a_long_context_is_served_capped(capsys):
    """Qwen3's 40,960 positions would make each slot's KV cache 4.6 GB: the server holds 4,096 unless told."""
    from gptjax.cli.serve import SERVE_CONTEXT, _serving_context
    from gptjax.config import GPTConfig

    cfg = Qwen3Config()
    assert _serving_context(cfg, None).context_length == SERVE_CONTEXT == 4096
    assert "--context-length N for longer ones" in capsys.readouterr().err
    assert _serving_context(cfg, 8192).context_length == 8192
    with pytest.raises(ValueError, match="--context-length must be in 1..40960"):
        _serving_context(cfg, 50000)
    with pytest.raises(ValueError, match="GPT-2's learned positions fix its context at 256"):
        _serving_context(GPTConfig(), 128)
    assert _serving_context(GPTConfig(), None) == GPTConfig()
