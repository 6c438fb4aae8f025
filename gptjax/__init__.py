"""gptjax: the GPT-2 model of *Build a Large Language Model (From Scratch)*, chapter 5, in JAX/Flax."""

# First, before anything can start a jax backend: every command and notebook imports gptjax.
from gptjax.jax_start import start_present_platforms_only

start_present_platforms_only()

from gptjax.config import GPT_CONFIG_124M, PRESETS, GPTConfig, get_config
from gptjax.attention import causal_attention
from gptjax.model import (
    GPTModel,
    abstract_params,
    apply,
    apply_with_cache,
    init_cache,
    init_params,
    model_from_params,
    param_count,
)
from gptjax.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from gptjax.sampling import generate
from gptjax.weights import load_weights, save_weights
from gptjax.weights.book import from_torch_state_dict, to_torch_state_dict

__all__ = [
    "GPT_CONFIG_124M",
    "PRESETS",
    "GPTConfig",
    "GPTModel",
    "abstract_params",
    "apply",
    "apply_with_cache",
    "causal_attention",
    "from_torch_state_dict",
    "generate",
    "get_config",
    "get_tokenizer",
    "init_cache",
    "init_params",
    "load_weights",
    "model_from_params",
    "param_count",
    "save_weights",
    "text_to_token_ids",
    "to_torch_state_dict",
    "token_ids_to_text",
]
