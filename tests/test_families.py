"""Llama 3.2 and Qwen3 (gptjax.gqa, the book's chapter-5 bonus models): a Hugging Face folder that transformers
wrote, read by gptjax.load_weights, gives transformers' logits (float32, tiny random configs: grouped-query
attention, an explicit head size, tied and untied heads, Llama 3's RoPE scaling); the KV cache decodes the
tokens the full forward pass picks; the presets are the book's."""

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM

import gptjax
from gptjax.gqa import untie_head
from gptjax.llama3 import LLAMA3_CONFIGS, Llama3Config
from gptjax.model import apply_with_cache, init_cache
from gptjax.qwen3 import QWEN3_CONFIGS, Qwen3Config
from gptjax.data import create_dataloader
from gptjax.flops import flops_per_token
from gptjax.training import TrainConfig, init_opt_state, make_optimizer, make_train_step, train_model_simple
from gptjax.weights import load_weights

TOL = 1e-5
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
HF_MODELS = {
    "qwen3-tied": lambda: Qwen3ForCausalLM(HFQwen3Config(**COMMON, head_dim=32, max_position_embeddings=128,
                                                         rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                                         tie_word_embeddings=True)),
    "qwen3-untied": lambda: Qwen3ForCausalLM(HFQwen3Config(**COMMON, head_dim=16, max_position_embeddings=128,
                                                           tie_word_embeddings=False)),
    "llama3.2": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, max_position_embeddings=256, rms_norm_eps=1e-5,
                                                     rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(HF_MODELS))
def hf_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = HF_MODELS[request.param]().eval()
    with torch.no_grad():  # RMSNorm scales start at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, model, folder


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()


def test_logits_match_transformers(hf_folder):
    name, model, folder = hf_folder
    params, cfg = load_weights(folder)
    assert isinstance(cfg, Llama3Config if name.startswith("llama") else Qwen3Config)
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert ("out_head" in params) != cfg.tie_embeddings
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 40))
    want = hf_logits(model, ids)
    assert np.abs(np.asarray(gptjax.apply(params, cfg, ids)) - want).max() <= TOL
    # Positions past the original context of Llama 3's RoPE scaling, and a batch of one.
    long_ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(1, min(cfg.context_length, 100)))
    assert np.abs(np.asarray(gptjax.apply(params, cfg, long_ids)) - hf_logits(model, long_ids)).max() <= TOL


def test_kv_cache_decodes_what_the_full_pass_picks(hf_folder):
    _, _, folder = hf_folder
    params, cfg = load_weights(folder)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 7))
    step = jax.jit(lambda p, t, c, pos: apply_with_cache(p, cfg, t, c, pos))
    logits, cache = step(params, ids, init_cache(cfg, 2, slots=32), 0)
    tokens = ids
    for _ in range(6):
        nxt = np.asarray(logits[:, -1].argmax(-1))[:, None]
        full = np.asarray(gptjax.apply(params, cfg, tokens))
        np.testing.assert_allclose(np.asarray(logits[:, -1]), full[:, -1], atol=TOL)
        tokens = np.concatenate([tokens, nxt], axis=1)
        logits, cache = step(params, nxt, cache, tokens.shape[1] - 1)
    assert cache[0]["k"].shape == (2, cfg.n_kv_groups, 32, cfg.head_dim)


def test_written_back_as_a_folder_transformers_loads(hf_folder, tmp_path):
    name, model, folder = hf_folder
    params, cfg = load_weights(folder)
    gptjax.save_weights(params, cfg, tmp_path / "back", format="hf")
    back = type(model).from_pretrained(tmp_path / "back").eval()
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, size=(2, 30))
    assert np.abs(hf_logits(back, ids) - hf_logits(model, ids)).max() <= TOL
    again, again_cfg = load_weights(tmp_path / "back")
    assert again_cfg == cfg
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_six_training_steps_match_torch(hf_folder):
    """gptjax's train step (AdamW with torch's defaults) on a family's model, against the same six steps of
    torch.optim.AdamW on transformers' model: the losses agree to 1e-5."""
    import copy

    _, model, folder = hf_folder
    params, cfg = load_weights(folder)
    torch_model = copy.deepcopy(model).train()
    tcfg = TrainConfig(batch_size=2, lr=4e-4, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    optimizer = make_optimizer(tcfg, 6)
    step, opt_state = make_train_step(cfg, optimizer), init_opt_state(optimizer, params)
    batches = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(6, 2, 17))
    for i, batch in enumerate(batches):
        x, y = batch[:, :-1], batch[:, 1:]
        logits = torch_model(torch.as_tensor(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(y).flatten())
        torch_opt.zero_grad()
        loss.backward()
        torch_opt.step()
        params, opt_state, metrics = step(params, opt_state, (x, y), jax.random.key(i))
        assert abs(float(metrics["loss"]) - loss.item()) <= TOL, i


def test_generate_runs_every_family():
    """gptjax.generate, unchanged, on both families: greedy tokens are the full pass's argmax, past the context
    too (the window slides), and from int8 weights. A prompt near the context keeps the reference loop's
    shapes (and compiles) few."""
    for cfg in (Qwen3Config(vocab_size=300, context_length=16, emb_dim=64, n_heads=4, n_layers=2, hidden_dim=96,
                            head_dim=32, n_kv_groups=2),
                Llama3Config(vocab_size=300, context_length=16, emb_dim=64, n_heads=4, n_layers=2, hidden_dim=96,
                             n_kv_groups=2, rope_original_context_length=8)):
        params = gptjax.init_params(cfg, 0)
        ids = np.random.default_rng(5).integers(0, cfg.vocab_size, size=(2, 14))
        tokens = ids
        for _ in range(12):
            window = tokens[:, -cfg.context_length:]
            tokens = np.concatenate([tokens, np.asarray(gptjax.apply(params, cfg, window))[:, -1].argmax(-1)[:, None]], 1)
        np.testing.assert_array_equal(gptjax.generate(params, cfg, ids, 12), tokens)
    assert gptjax.generate(params, cfg, ids, 4, weights_dtype="int8").shape == (2, 18)


def test_an_untied_copy_of_a_tied_head_gives_the_same_logits():
    """What decoding on CPU runs on (gptjax.gqa.untie_head): the head as a kernel of its own, the embedding
    transposed; generate takes it (the test above: the greedy tokens of the tied model's full pass)."""
    cfg = Qwen3Config(vocab_size=300, context_length=16, emb_dim=64, n_heads=4, n_layers=2, hidden_dim=96,
                      head_dim=32, n_kv_groups=2)
    params = gptjax.init_params(cfg, 1)
    untied, untied_cfg = untie_head(params, cfg)
    assert not untied_cfg.tie_embeddings and untie_head(untied, untied_cfg) == (untied, untied_cfg)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, size=(2, 9))
    np.testing.assert_allclose(np.asarray(gptjax.apply(untied, untied_cfg, ids)),
                               np.asarray(gptjax.apply(params, cfg, ids)), rtol=1e-6, atol=1e-5)


def test_the_books_training_loop_runs_a_family():
    """train_model_simple, unchanged, on a Qwen3 config: its steps, evaluations and speed records (whose FLOPs
    count the tied head's matmul once, and attention over the query heads' width)."""
    cfg = Qwen3Config(vocab_size=300, context_length=16, emb_dim=64, n_heads=4, n_layers=2, hidden_dim=96,
                      head_dim=32, n_kv_groups=2)
    ids = np.random.default_rng(7).integers(0, cfg.vocab_size, 400)
    train = create_dataloader(ids[:320], batch_size=2, max_length=16, stride=16, shuffle=True, drop_last=True)
    val = create_dataloader(ids[320:], batch_size=2, max_length=16, stride=16, shuffle=False, drop_last=False)
    tcfg = TrainConfig(epochs=2, eval_freq=3, eval_iter=1, start_context="")
    result = train_model_simple(gptjax.init_params(cfg, 0), cfg, train, val, tcfg, progress=False)
    assert result.position.step == 2 * len(train) and len(result.history.step_losses) == 2 * len(train)
    assert result.history.val_losses and all(np.isfinite(result.history.step_losses))
    assert result.speed["tokens_per_sec"] > 0
    n = gptjax.param_count(gptjax.abstract_params(cfg))  # the tied head multiplies by tok_emb: all of it counts
    assert flops_per_token(cfg, 16) == 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 16


def test_presets_are_the_books():
    q = QWEN3_CONFIGS["qwen3-0.6b"]
    assert (q.emb_dim, q.n_heads, q.n_kv_groups, q.head_dim, q.hidden_dim, q.n_layers) == (1024, 16, 8, 128, 3072, 28)
    # The book's count of unique parameters (the output head is the token embedding)
    assert gptjax.param_count(gptjax.abstract_params(q)) == 596_049_920
    llama = LLAMA3_CONFIGS["llama-3.2-1b"]
    assert gptjax.param_count(gptjax.abstract_params(llama)) == 1_235_814_400
    assert (llama.head_dim, llama.rope_freq.factor, llama.rope_freq.original_context_length) == (64, 32.0, 8192)
    with pytest.raises(ValueError, match="n_heads .* must be a multiple of n_kv_groups"):
        Qwen3Config(n_heads=6, n_kv_groups=4)
