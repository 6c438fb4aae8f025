"""`python -m gptjax.generate` end to end on tiny torch .pth files."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gptjax import GPTConfig, get_tokenizer, text_to_token_ids, token_ids_to_text
from gptjax.cli.generate import main
from gptjax.tokenizer import ENDOFTEXT, ENDOFTEXT_ID
from tests.torch_reference import GPTModel as TorchGPTModel
from tests.torch_reference import generate_text_simple, randomize_

# GPT-2's vocabulary (the tokenizer's), everything else tiny; head size 64 as in every GPT-2.
CFG = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_layers=1, n_heads=1, qkv_bias=False)
PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def torch_pth(tmp_path_factory):
    model = randomize_(TorchGPTModel(CFG.to_dict()), seed=0).eval()
    path = tmp_path_factory.mktemp("weights") / "model.pth"
    torch.save(model.state_dict(), path)
    return model, str(path)


@pytest.fixture(scope="module")
def eos_pth(tmp_path_factory):
    """A model whose every next token is <|endoftext|>: constant final features, eos row aligned."""
    model = randomize_(TorchGPTModel(CFG.to_dict()), seed=1).eval()
    with torch.no_grad():
        model.final_norm.scale.zero_()
        model.final_norm.shift.copy_(torch.linspace(-1.0, 1.0, CFG.emb_dim))
        model.out_head.weight[ENDOFTEXT_ID] = 100.0 * model.final_norm.shift
    path = tmp_path_factory.mktemp("weights") / "eos.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_matches_the_torch_reference(capsys, torch_pth):
    model, path = torch_pth
    code, out, err = run(capsys, "--weights", path, "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0")
    ids = torch.tensor(np.asarray(text_to_token_ids(PROMPT)), dtype=torch.long)
    want = token_ids_to_text(generate_text_simple(model, ids, 8, CFG.context_length).numpy())
    assert code == 0 and out == want + "\n"
    # A .pth without its config: one notice with the head count assumed and how to override it.
    assert err == (f"note: torch checkpoint {path} holds no head count: assuming 1 head of 64 (GPT-2's head size); "
                   "if that is wrong, pass the head count as --n-heads\n")
    code, out2, err = run(capsys, "--weights", path, "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0",
                          "--n-heads", "1")
    assert (code, out2, err) == (0, out, "")


def test_prompt_longer_than_the_context_gets_one_notice(capsys, torch_pth):
    _, path = torch_pth
    long_prompt = " ".join(["word"] * (CFG.context_length + 8))
    n = text_to_token_ids(long_prompt).shape[1]
    code, out, err = run(capsys, "--weights", path, "--prompt", long_prompt, "--max-new-tokens", "2",
                         "--temperature", "0", "--n-heads", "1")
    assert code == 0 and out.startswith(long_prompt)
    assert err == (f"note: the prompt is {n} tokens, longer than the model's context of {CFG.context_length}: the "
                   f"model sees only its last {CFG.context_length} (as in the book)\n")


def test_sampling_defaults_are_seeded(capsys, torch_pth):
    _, path = torch_pth
    outputs = [run(capsys, "--weights", path, "--prompt", PROMPT, "--seed", seed)[1] for seed in ("5", "5", "6")]
    assert outputs[0] == outputs[1] != outputs[2]
    assert outputs[0].startswith(PROMPT)
    # The book's default of 25 new tokens (decoding can merge tokens, hence the tolerance).
    new_tokens = len(get_tokenizer().encode(outputs[0][len(PROMPT) :].rstrip("\n"), allowed_special="all"))
    assert 20 <= new_tokens <= 30


def test_eos_flag_stops_generation(capsys, eos_pth):
    args = ("--weights", eos_pth, "--prompt", PROMPT, "--max-new-tokens", "3", "--temperature", "0")
    assert run(capsys, *args)[1] == PROMPT + ENDOFTEXT * 3 + "\n"
    assert run(capsys, *args, "--eos")[1] == PROMPT + "\n"


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--temperature", "-1"], "--temperature must be at least 0 (0 is greedy), got -1.0"),
        (["--top-k", "-2"], "--top-k must be between 0 (off) and the model's vocabulary size, got -2"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be at least 0, got -1"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, torch_pth, extra, message, monkeypatch):
    _, path = torch_pth

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the settings were checked")

    monkeypatch.setattr("gptjax.weights.load_weights", no_loading)
    code, out, err = run(capsys, "--weights", path, "--prompt", PROMPT, *extra)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_top_k_past_the_models_vocabulary_is_a_one_line_error(capsys, torch_pth):
    """The bound is the model's vocabulary, known once its config is read."""
    code, out, err = run(capsys, "--weights", torch_pth[1], "--prompt", PROMPT, "--top-k", "999999", "--n-heads", "1")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "--top-k must be between 0 (off) and the model's vocabulary size 50257, got 999999" in err


def test_missing_weights_path_from_the_command_line(tmp_path):
    missing = tmp_path / "nowhere.pth"
    proc = subprocess.run(
        [sys.executable, "-m", "gptjax.generate", "--weights", str(missing), "--prompt", PROMPT],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.splitlines()[-1]  # after any import-time noise of jax's plugins
    assert last.startswith("error: ") and str(missing) in last and "Traceback" not in proc.stderr
