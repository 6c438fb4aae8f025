"""EleutherAI's lm-evaluation-harness evaluating ``python -m gptjax.serve``, as a user runs it: ``local-completions``
against a server on 127.0.0.1 with the server's own tokenizer (``tokenizer_backend=remote``), on a multiple-choice
and a generate_until task defined in YAML over JSONL files (no download).

Each choice's log-likelihood that lm_eval records equals gptjax's own scoring of the same tokens (the HellaSwag
scorer's summed loss) within 1e-4 and its greedy flag the argmax check; the same task through lm_eval's
``hf`` backend on the same weights as a Hugging Face folder gives the same numbers; generate_until answers
are gptjax.generate's greedy text cut at the task's stop strings."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

import gptjax
from gptjax import GPTConfig
from gptjax.hellaswag import _ending_losses
from gptjax.model import apply
from gptjax.sampling import generate
from tests.served import running_server

lm_eval = pytest.importorskip("lm_eval")  # in the dev extra

ROOT = Path(__file__).resolve().parent.parent
CFG = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0)
MC = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a large city"], "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "Jack had always been", "choices": [" a genius", " rather a cheap genius", " poor"], "answer": 1},
    {"question": "The sky is", "choices": [" blue", " green", " falling down today"], "answer": 0},
    {"question": "I", "choices": [" am", " was here"], "answer": 1},
]
GEN = [{"prompt": "Every effort moves you", "target": "forward"}, {"prompt": "Once upon a time", "target": "there"},
       {"prompt": "The Verdict, by Edith Wharton.", "target": "I"}]
UNTIL = ["\n", "."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm_eval")
    params = gptjax.init_params(CFG, seed=11)
    gptjax.save_weights(params, CFG, tmp / "tiny")
    (tmp / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    (tmp / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in GEN))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(textwrap.dedent(f"""\
        task: gptjax_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp / "mc.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """))
    (tasks / "gen.yaml").write_text(textwrap.dedent(f"""\
        task: gptjax_gen
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp / "gen.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{{{prompt}}}}"
        doc_to_target: "{{{{target}}}}"
        generation_kwargs:
          until: {json.dumps(UNTIL)}
          max_gen_toks: 12
        metric_list:
          - metric: exact_match
        """))
    # The same weights as a Hugging Face folder, with GPT-2's tokenizer files, for lm_eval's hf backend.
    from gptjax.weights.gguf import gpt2_tokens_and_merges

    hf = tmp / "hf"
    gptjax.save_weights(params, CFG, hf, format="hf")
    tokens, merges = gpt2_tokens_and_merges()
    (hf / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (hf / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (hf / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer", "eos_token": tokens[-1],
                                                           "bos_token": tokens[-1], "unk_token": tokens[-1]}))
    return tmp, params


@pytest.fixture(scope="module")
def server(setup):
    tmp, _ = setup
    with running_server(tmp / "tiny", "--max-batch", "4") as (_, url):
        yield url


def evaluate(model: str, model_args: str, tmp: Path) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["gptjax_mc", "gptjax_gen"],
                                   task_manager=TaskManager(include_path=str(tmp / "tasks")), log_samples=True,
                                   apply_chat_template=False)


@pytest.fixture(scope="module")
def served(setup, server):
    args = f"model=tiny,base_url={server}/v1/completions,max_length=128,tokenizer_backend=remote,num_concurrent=2"
    return evaluate("local-completions", args, setup[0])


def reference(params, context: str, continuation: str) -> tuple[float, bool]:
    """gptjax's own log-likelihood of ``continuation`` after ``context`` (tokenized as lm_eval does: the whole
    string, the context's tokens split off), and whether every continuation token is the argmax."""
    tok = gptjax.get_tokenizer()
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    tokens = np.array([whole])
    mask = np.zeros_like(tokens, np.float32)
    mask[0, len(ctx):] = 1
    loglik = -float(_ending_losses(params, CFG, tokens, mask)[0])
    logits = np.asarray(apply(params, CFG, tokens[:, :-1]))[0]
    greedy = all(int(np.argmax(logits[i - 1])) == whole[i] for i in range(len(ctx), len(whole)))
    return loglik, greedy


def test_multiple_choice_logliks_equal_gptjax_scoring(setup, served):
    _, params = setup
    samples = served["samples"]["gptjax_mc"]
    assert len(samples) == len(MC)
    checked = 0
    for sample in samples:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            loglik, greedy = resp[0]
            ref_loglik, ref_greedy = reference(params, context, continuation)
            assert abs(loglik - ref_loglik) < 1e-4, (context, continuation, loglik, ref_loglik)
            assert greedy == ref_greedy
            checked += 1
    assert checked == sum(len(d["choices"]) for d in MC)
    accuracy = np.mean([max(range(len(s["resps"])), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in samples])
    assert served["results"]["gptjax_mc"]["acc,none"] == pytest.approx(accuracy)


def test_generate_until_answers_are_generates_greedy_text(setup, served):
    _, params = setup
    tok = gptjax.get_tokenizer()
    samples = served["samples"]["gptjax_gen"]
    assert len(samples) == len(GEN)
    for sample in samples:
        context = sample["arguments"][0][0]
        ids = tok.encode(context)
        out = generate(params, CFG, np.array([ids]), 12, eos_id=50256)[0, len(ids):].tolist()
        text = tok.decode([t for t in out if t != 50256][: out.index(50256) if 50256 in out else None])
        for stop in UNTIL:
            text = text.split(stop)[0]
        assert sample["resps"][0][0] == text


def test_the_hf_backend_on_the_same_weights_agrees(setup, served):
    tmp, _ = setup
    hf = evaluate("hf", f"pretrained={tmp / 'hf'},dtype=float32,device=cpu,max_length=128", tmp)
    assert hf["results"]["gptjax_mc"]["acc,none"] == served["results"]["gptjax_mc"]["acc,none"]
    for ours, theirs in zip(served["samples"]["gptjax_mc"], hf["samples"]["gptjax_mc"]):
        for a, b in zip(ours["resps"], theirs["resps"]):
            assert abs(a[0][0] - b[0][0]) < 1e-4 and a[0][1] == b[0][1]
    assert [s["resps"][0][0] for s in served["samples"]["gptjax_gen"]] == \
        [s["resps"][0][0] for s in hf["samples"]["gptjax_gen"]]
