"""HellaSwag scoring against an independent scoring with transformers' GPT2LMHeadModel carrying the same
weights (llm.c's dev/data/hellaswag.py, written out with torch), the evaluate CLI, and --hellaswag in training."""

import json
import re

import jax
import numpy as np
import pytest
import torch

import gptjax
from gptjax import GPTConfig, get_tokenizer, hellaswag
from gptjax.checkpoint import load_params
from gptjax.cli.evaluate import main as evaluate_main
from gptjax.cli.train import main as train_main
from gptjax.weights import save_weights
from tests.test_dashboards import accumulator, scalars
from tests.test_train_cli import STORY, TINY, read_jsonl

# GPT-2's vocabulary (the examples are GPT-2 tokens), all else tiny.
CFG = GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_layers=2, n_heads=2, qkv_bias=True)
CONTEXTS = [
    "A man is standing on a ladder. He",
    "The girl ties her shoes, then",
    "Two dogs run across the park and one of them finally catches the red frisbee in the air while the owner "
    "claps and the other dog",
    "Cooking pasta: the water is boiling, so she",
    "A woman is sitting at a piano. She",
    "The players line up on the field as the referee",
]
ENDINGS = [
    ["paints the wall.", "flies away over the roof of the house.", "eats.", "sings a long song about ladders."],
    ["runs out the door.", "sleeps.", "falls into the soup bowl and cries for an hour.", "laughs."],
    ["barks.", "lies down in the grass.", "jumps over the moon.", "rides a bicycle to the shop."],
    ["adds the pasta and a pinch of salt.", "goes swimming.", "reads.", "calls the police."],
    ["plays a song.", "sets her hands on the keys and begins.", "eats the piano.", "leaves."],
    ["blows the whistle.", "sits.", "dances across the grass.", "throws the ball to the crowd."],
]


def write_examples(path, contexts, endings, labels):
    with open(path, "w", encoding="utf-8") as f:
        for i, (ctx, ends, label) in enumerate(zip(contexts, endings, labels)):
            # As in hellaswag_val.jsonl: fields beyond ctx, endings and label are ignored.
            f.write(json.dumps({"ind": i, "activity_label": "Test", "ctx_a": ctx, "ctx_b": "", "ctx": ctx,
                                "split": "val", "split_type": "indomain", "label": label, "endings": ends,
                                "source_id": f"test~{i}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Random weights, scaled up so that the endings' losses differ by far more than the tolerance."""
    params = gptjax.init_params(CFG, seed=7)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.3 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    path = tmp_path_factory.mktemp("hellaswag") / "hf"
    save_weights(params, CFG, path, format="hf")
    return params, path


@pytest.fixture(scope="module")
def examples_file(tmp_path_factory):
    return write_examples(tmp_path_factory.mktemp("data") / "hellaswag_val.jsonl", CONTEXTS, ENDINGS,
                          [0, 3, 1, 0, 1, 2])


def reference_losses(hf_dir, path):
    """(summed, mean) ending losses [N, 4] as llm.c's evaluate() computes them, with GPT2LMHeadModel."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    enc = get_tokenizer()
    sums, means = [], []
    for line in path.read_text().splitlines():
        example = json.loads(line)
        ctx = enc.encode(example["ctx"])
        rows = [ctx + enc.encode(" " + end) for end in example["endings"]]
        width = max(map(len, rows))
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width))
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
            mask[i, len(ctx):len(row)] = 1
        with torch.no_grad():
            logits = model(tokens).logits
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                   tokens[:, 1:].reshape(-1), reduction="none").view(4, -1)
        total = (losses * mask[:, 1:]).sum(1)
        sums.append(total.numpy())
        means.append((total / mask[:, 1:].sum(1)).numpy())
    return np.array(sums), np.array(means)


def test_losses_and_choices_match_transformers(model, examples_file):
    params, hf_dir = model
    ref_sum, ref_mean = reference_losses(hf_dir, examples_file)
    # A small batch: several batches, two bucket lengths and padding rows are all exercised.
    scores = hellaswag.score(params, CFG, hellaswag.load_examples(examples_file), batch_tokens=256)
    np.testing.assert_allclose(scores.sum_losses, ref_sum, rtol=0, atol=1e-4)
    np.testing.assert_allclose(scores.mean_losses, ref_mean, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(scores.sum_losses.argmin(1), ref_sum.argmin(1))
    np.testing.assert_array_equal(scores.mean_losses.argmin(1), ref_mean.argmin(1))
    # The two rules choose differently somewhere here, so each accuracy is checked on its own.
    assert (ref_sum.argmin(1) != ref_mean.argmin(1)).any()
    labels = scores.labels
    assert scores.acc == np.mean(ref_sum.argmin(1) == labels)
    assert scores.acc_norm == np.mean(ref_mean.argmin(1) == labels)


def test_evaluate_cli_prints_the_accuracies(model, examples_file, capsys):
    _, hf_dir = model
    ref_sum, ref_mean = reference_losses(hf_dir, examples_file)
    labels = np.array([json.loads(line)["label"] for line in examples_file.read_text().splitlines()])
    assert evaluate_main(["--weights", str(hf_dir), "--hellaswag", str(examples_file)]) == 0
    m = re.search(r"^hellaswag .*: 6 examples, acc (\S+), acc_norm (\S+)$", capsys.readouterr().out, re.M)
    assert (float(m[1]), float(m[2])) == (round(np.mean(ref_sum.argmin(1) == labels), 4),
                                          round(np.mean(ref_mean.argmin(1) == labels), 4))


@pytest.mark.parametrize("line,words", [
    ("not json", "is not JSON"),
    ('{"ctx": "a", "endings": ["b", "c", "d"], "label": 0}', "'endings' must be a list of 4"),
    ('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 4}', "'label' must be the index 0-3"),
    ('{"endings": ["b", "c", "d", "e"], "label": 1}', "'ctx' must be"),
])
def test_a_bad_file_is_a_one_line_error_naming_it(model, tmp_path, capsys, line, words):
    _, hf_dir = model
    path = tmp_path / "bad.jsonl"
    path.write_text('{"ctx": "fine", "endings": ["a", "b", "c", "d"], "label": 2}\n' + line + "\n")
    assert evaluate_main(["--weights", str(hf_dir), "--hellaswag", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path} line 2") and words in err and "\n" not in err
    assert evaluate_main(["--weights", str(hf_dir), "--hellaswag", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl not found" in capsys.readouterr().err


def test_an_ending_longer_than_the_context_is_refused(model, tmp_path):
    path = write_examples(tmp_path / "long.jsonl", ["Short."], [["word " * 70, "a", "b", "c"]], [1])
    with pytest.raises(ValueError, match=r"example 1 has an ending of \d+ tokens"):
        hellaswag.check_fits(hellaswag.load_examples(path), CFG, path)


def test_a_long_context_loses_its_start():
    ex = hellaswag.Example(list(range(1, 11)), [[20, 21], [22], [23, 24, 25], [26]], 0)
    rows = hellaswag._rows(ex, 6)
    assert rows[0] == ([7, 8, 9, 10, 20, 21], 2) and rows[2] == ([8, 9, 10, 23, 24, 25], 3)
    assert rows[1] == ([6, 7, 8, 9, 10, 22], 1)


def test_training_logs_hellaswag(tmp_path):
    corpus = tmp_path / "story.txt"
    corpus.write_text(STORY * 5, encoding="utf-8")
    # Short enough for TINY's 16-token context.
    path = write_examples(tmp_path / "hs.jsonl", ["The man picked up the", "She opened the door and"],
                          [["ball.", "sky.", "idea.", "cup."], ["walked in.", "sang.", "left.", "ran."]], [0, 2])
    out = tmp_path / "run"
    assert train_main([*TINY, "--corpus", str(corpus), "--max-steps", "5", "--eval-freq", "3", "--eval-iter", "1",
                       "--hellaswag", str(path), "--hellaswag-every", "2", "--out", str(out)]) == 0
    logged = [r for r in read_jsonl(out / "metrics.jsonl") if "hellaswag_acc_norm" in r]
    assert [r["step"] for r in logged] == [0, 2, 4]
    assert set(logged[0]) == {"step", "epoch", "tokens_seen", "hellaswag_acc", "hellaswag_acc_norm"}
    params, cfg = load_params(out)  # the end of the run: the parameters after step 4
    scores = hellaswag.score(params, cfg, hellaswag.load_examples(path))
    assert (logged[-1]["hellaswag_acc"], logged[-1]["hellaswag_acc_norm"]) == (scores.acc, scores.acc_norm)
    events = scalars(accumulator(out), "hellaswag_acc_norm")
    assert events == [(r["step"], np.float32(r["hellaswag_acc_norm"])) for r in logged]


def test_hellaswag_every_needs_a_file(tmp_path, capsys):
    assert train_main([*TINY, "--hellaswag-every", "3", "--out", str(tmp_path / "run")]) == 2
    assert "--hellaswag-every needs --hellaswag" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
