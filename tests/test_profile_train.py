"""benchmarks/profile_train.py puts a train step's operations in the kinds NOTES.md reports (on a tiny model:
the classification, not the timings), and leaves the model's layers as it found them."""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptjax import GPTConfig, model, platform

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import profile_train  # noqa: E402

CFG = GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_layers=2, n_heads=4, drop_rate=0.0, qkv_bias=True)


def test_every_layer_of_the_step_is_attributed():
    layer_norm, logits = model.LayerNorm.__call__, platform.logits
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 2, CFG.context_length), dtype=np.int32)
    ops, wall = profile_train.profile_jax(CFG, ids[0], ids[1], jnp.float32)
    assert wall > 0 and set(ops) <= set(profile_train.KINDS)
    for kind in ("weight matmuls", "attention", "layer norm", "cross-entropy", "optimizer", "embedding"):
        assert ops.get(kind, 0) > 0, (kind, ops)
    assert model.LayerNorm.__call__ is layer_norm and platform.logits is logits


def test_torch_operators_by_name_and_caller():
    kind = profile_train.torch_kind
    assert kind("aten::mm", ["autograd::engine::evaluate_function: MmBackward0"]) == "weight matmuls"
    assert kind("aten::mul_", ["Optimizer.step#AdamW.step"]) == "optimizer"
    assert kind("graph_0_cpp_fused__softmax__to_copy_masked_fill_native_dropout_3", []) == "attention"
    assert kind("graph_0_cpp_fused_add_mul_pow_sqrt_tanh_view_10", []) == "GELU"
    assert kind("graph_0_cpp_fused_add_div_mean_mul_native_dropout_sqrt_sub_var_view_7", []) == "layer norm"
    assert kind("aten::_log_softmax_backward_data", []) == "cross-entropy"
    assert kind("aten::copy_", []) == "other"
