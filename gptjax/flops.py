"""Training speed: model FLOPs per token, the devices' datasheet peak, and tokens/s with MFU.

MFU (model FLOPs utilisation, PaLM's appendix B; nanoGPT's ``estimate_mfu``) is the share of the devices'
peak that the model's own arithmetic would use at the measured token rate:

    mfu = flops_per_token * tokens_per_sec / (peak FLOP/s per device * devices)

Model FLOPs are those of the matmuls the model needs, forward and backward: 6 per matmul parameter and
token, plus attention's scores and weighted values. Work the hardware does on top of that (recomputation
with ``remat``, the padded vocabulary, masked attention entries) is not counted, so MFU compares setups
on the same footing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax

from gptjax.config import GPTConfig
from gptjax.model import abstract_params, param_count

# Dense (no sparsity) datasheet peak in TFLOPS per jax device, by ``jax.Device.device_kind``, for the two
# compute dtypes of the train step (TrainConfig.dtype). "float32" is the rate of a float32 matmul at JAX's
# default precision, which is what the model's matmuls use: TF32 tensor cores on NVIDIA A100/H100/H200, one
# bfloat16 pass of the MXU on TPU (so the bfloat16 figure). Only devices whose datasheet and device_kind
# are known are listed; for any other, pass the peak yourself (``peak_tflops``).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # NVIDIA A100 datasheet: BF16 312, TF32 156 (SXM4 and PCIe alike).
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100-PCIE-40GB": {"bfloat16": 312.0, "float32": 156.0},
    "NVIDIA A100 80GB PCIe": {"bfloat16": 312.0, "float32": 156.0},
    # NVIDIA H100 / H200 datasheets (figures "with sparsity" halved): SXM BF16 989.4, TF32 494.7;
    # PCIe BF16 756, TF32 378; NVL BF16 835.5, TF32 417.5.
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "NVIDIA H100 NVL": {"bfloat16": 835.5, "float32": 417.5},
    "NVIDIA H200": {"bfloat16": 989.4, "float32": 494.7},
    "NVIDIA H200 NVL": {"bfloat16": 835.5, "float32": 417.5},
    # Google Cloud TPU system architecture pages, per chip (one jax device per chip on these).
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0},  # v5e
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0},
    "TPU v5": {"bfloat16": 459.0, "float32": 459.0},  # v5p
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0},  # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0},
}


def peak_tflops(device_kind: str, dtype: str = "float32") -> float | None:
    """The datasheet peak of one device of this kind for the compute ``dtype`` (None: not in the table)."""
    return PEAK_TFLOPS.get(device_kind, {}).get(dtype)


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Model FLOPs of one token of a training step (forward and backward), PaLM's and nanoGPT's count:
    ``6 * N + 12 * n_layers * emb_dim * seq_len``.

    ``N`` counts the parameters that multiply: all but the ``tok_emb`` and ``pos_emb`` tables, which are
    looked up. The book's ``out_head`` is a matrix of its own, so it is in ``N``; a model whose head is the token
    embedding (Llama 3.2, the small Qwen3) multiplies by that table once more, so it counts once. The second
    term is attention's ``q @ k^T`` and ``weights @ v`` over ``seq_len`` positions (default: the context
    length) for the query heads' width (GPT-2: ``emb_dim``), counted in full as PaLM does, although the
    causal mask makes half of it zeros."""
    seq_len = cfg.context_length if seq_len is None else seq_len
    params = abstract_params(cfg)
    tok_emb = params["tok_emb"]["embedding"].size
    pos_emb = params["pos_emb"]["embedding"].size if "pos_emb" in params else 0
    n = param_count(params) - tok_emb - pos_emb + (0 if "out_head" in params else tok_emb)
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


@dataclass
class Throughput:
    """Tokens/s and MFU of each step and of the run so far, from the seconds each step took.

    ``peak_flops`` is the FLOP/s of all the devices the step runs on together (None: MFU unknown)."""

    flops_per_token: float
    peak_flops: float | None = None
    tokens: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def step(self, tokens: int, seconds: float) -> dict[str, float | None]:
        """Count one step; its ``tokens_per_sec`` and ``mfu``."""
        self.tokens += tokens
        self.seconds += seconds
        return self._speed(tokens, seconds)

    def average(self) -> dict[str, float | None]:
        """The run's ``tokens_per_sec`` and ``mfu``: all tokens over all step time."""
        return self._speed(self.tokens, self.seconds)

    def _speed(self, tokens: int, seconds: float) -> dict[str, float | None]:
        rate = tokens / seconds if seconds > 0 else None
        mfu = None if rate is None or self.peak_flops is None else rate * self.flops_per_token / self.peak_flops
        return {"tokens_per_sec": rate, "mfu": mfu}


def device_peak_flops(devices: list[jax.Device] | set[jax.Device], dtype: str,
                      peak_tflops_per_device: float | None = None) -> float | None:
    """FLOP/s of ``devices`` together: ``peak_tflops_per_device`` if given, else the datasheet peak of their
    kind for ``dtype`` (None when that is unknown, as for CPUs)."""
    devices = list(devices)
    if peak_tflops_per_device is None:
        kinds = {d.device_kind for d in devices}
        peaks = {peak_tflops(kind, dtype) for kind in kinds}
        if len(peaks) != 1 or None in peaks:
            return None
        peak_tflops_per_device = peaks.pop()
    return peak_tflops_per_device * 1e12 * len(devices)
