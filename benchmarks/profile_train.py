"""Where a training step's time goes, by kind of operation: gptjax's XLA profile beside torch's.

    python benchmarks/profile_train.py [--cases book gpt2-1024] [--dtypes float32 bfloat16] [--torch compile eager]
                                       [--out benchmarks/results/profile_train.json]

The cases and both implementations are :mod:`bench_train`'s (the step ``python -m gptjax.train`` runs, and
the book's ``GPTModel`` with AdamW). After warm-up steps, one step of each is profiled:

- gptjax: ``jax.profiler`` records every XLA:CPU operation of the compiled step. To say which layer an
  operation belongs to, the layers' calls are wrapped in ``jax.named_scope`` while this script traces the
  step (the names land in the compiled program's metadata); the model's own code carries no profiling
  scopes. Operations inside the blocked attention's custom backward carry no metadata and are counted as
  attention (nothing else in the step is a custom_vjp body that large).
- torch: ``torch.profiler`` records the step; each operator's self time is put in a kind by its name
  (torch.compile's generated kernels are named after what they fuse, e.g. ``cpp_fused__softmax_...``).

The operations' own durations are summed per kind (``op_seconds`` in the JSON). XLA:CPU runs independent
operations side by side (each on fewer threads), torch one after another on all threads, so these sums
compare only within one implementation; the table shows each kind's share of the sum times the step's
wall time (an unprofiled step timed just before), which compares across them. Kinds: weight matmuls (q/k/v, attention output, feed-forward, output
head), attention (scores, softmax, mixing, attention dropout; forward and backward), layer norm, GELU, dropout
(its random bits and masks outside attention), cross-entropy, optimizer (AdamW and the gradient norm),
embedding, other (residual adds, copies).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import re
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import CASES, DTYPES, JaxRunner, TorchRunner, case_setup  # noqa: E402
from common import machine_info, timed, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("weight matmuls", "attention", "layer norm", "GELU", "dropout", "cross-entropy", "optimizer",
         "embedding", "other")


@contextlib.contextmanager
def layer_scopes():
    """The model's layers traced inside named scopes, restored afterwards."""
    import optax

    from gptjax import attention, model, platform

    targets = [(model.LayerNorm, "__call__", "layer_norm"), (model.GELU, "__call__", "gelu"),
               (model.FeedForward, "__call__", "weights"), (platform, "project_qkv", "weights"),
               (model.MultiHeadAttention, "__call__", "weights"), (platform, "logits", "weights"),
               (attention, "self_attention", "attention"), (attention, "causal_attention", "attention"),
               (optax, "softmax_cross_entropy_with_integer_labels", "cross_entropy")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def scoped(scope, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with jax.named_scope(f"KIND_{scope}"):
                return fn(*args, **kwargs)
        return wrapper

    for owner, name, scope in targets:
        setattr(owner, name, scoped(scope, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


JAX_SCOPE_KINDS = {"weights": "weight matmuls", "attention": "attention", "layer_norm": "layer norm",
                   "gelu": "GELU", "cross_entropy": "cross-entropy"}


def jax_kind(op_name: str | None) -> str:
    """The kind of one compiled instruction, from its metadata's op_name (None: no metadata)."""
    if op_name is None:
        return "attention"  # the blocked attention's custom_vjp bodies (see the module docstring)
    scopes = re.findall(r"KIND_(\w+)", op_name)
    if scopes:
        return JAX_SCOPE_KINDS[scopes[-1]]  # the innermost scope: the layer the op belongs to
    if re.search(r"bernoulli|threefry|RngStream", op_name):
        return "dropout"
    if "calc_loss_batch" not in op_name:
        return "optimizer"
    if re.search(r"_take|gather|scatter|embed", op_name):
        return "embedding"
    return "other"


def profile_jax(cfg, inputs, targets, dtype) -> tuple[dict[str, float], float]:
    with layer_scopes():
        runner = JaxRunner(cfg, inputs, targets, dtype, remat=False)
    for _ in range(2):
        runner.step()
    wall = timed(runner.step)
    metadata = {}
    for line in runner.step_fn.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            metadata[m.group(1)] = m.group(2)
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        runner.step()
        jax.profiler.stop_trace()
        from jax.profiler import ProfileData
        data = ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
        seconds = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if "XLA" not in line.name:  # XLA:CPU's executor threads; the host's Python lines are not ops
                    continue
                for event in line.events:
                    if event.name.startswith(("ThunkExecutor", "end: ", "SlinkyThreadPool")):
                        continue
                    seconds[jax_kind(metadata.get(event.name))] += event.duration_ns / 1e9
    return dict(seconds), wall


TORCH_PATTERNS = (  # first match wins; names of aten operators and of torch.compile's fused kernels, which
    # name what they fuse (a kernel fusing attention's softmax with its dropout is attention's)
    ("cross-entropy", r"log_softmax|nll_loss|cross_entropy"),
    ("attention", r"bmm|softmax|masked_fill|scaled_dot_product"),
    ("GELU", r"tanh"),
    ("layer norm", r"layer_norm|var_mean|_var_|_mean_|\bmean\b"),
    ("dropout", r"dropout|bernoulli"),
    ("embedding", r"embedding"),
    ("weight matmuls", r"\baten::(mm|addmm|matmul|linear)\b"),
)


def torch_kind(name: str, ancestors: list[str]) -> str:
    """The kind of a profiled torch operator, from its name and the names of the calls it ran inside."""
    if any(a.startswith("Optimizer.") for a in [name, *ancestors]):  # AdamW's step and zero_grad
        return "optimizer"
    for kind, pattern in TORCH_PATTERNS:
        if re.search(pattern, name):
            return kind
    return "other"


def profile_torch(cfg, inputs, targets, dtype_name, mode) -> tuple[dict[str, float], float]:
    import torch
    from torch._inductor import config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True  # the generated kernels appear by name in the profile
    runner = TorchRunner(cfg, inputs, targets, dtype_name, mode, "cpu")
    for _ in range(2):
        runner.step()
    wall = timed(runner.step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.step()
    seconds = collections.Counter()
    for event in prof.events():
        ancestors, parent = [], event.cpu_parent
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        seconds[torch_kind(event.name, ancestors)] += event.self_cpu_time_total / 1e6
    return dict(seconds), wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    parser.add_argument("--torch", nargs="*", choices=("eager", "compile"), default=["compile"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_train.json"))
    args = parser.parse_args(argv)
    if jax.default_backend() != "cpu":
        parser.error("profile_train.py profiles the CPU step (the torch side runs on the CPU)")

    results = dict(machine=machine_info(), cases=[])
    for name in args.cases:
        cfg, batch, _ = case_setup(name, 1)
        rng = np.random.default_rng(0)
        inputs, targets = (rng.integers(0, cfg.vocab_size, (batch, cfg.context_length), dtype=np.int32)
                           for _ in range(2))
        for dtype in args.dtypes:
            profiles = {"gptjax": profile_jax(cfg, inputs, targets, DTYPES[dtype])}
            for mode in args.torch:
                profiles[f"torch-{mode}"] = profile_torch(cfg, inputs, targets, dtype, mode)
            steps = {impl: dict(step_s=wall, op_seconds=ops, step_share_s={
                kind: wall * ops.get(kind, 0.0) / sum(ops.values()) for kind in KINDS})
                for impl, (ops, wall) in profiles.items()}
            results["cases"].append(dict(case=name, dtype=dtype, batch=batch, seq_len=cfg.context_length, **steps))
            print(f"\n== {name}, batch {batch} x {cfg.context_length}, {dtype}: seconds of the step, by kind")
            print(f"{'kind':16}" + "".join(f"{impl:>15}" for impl in steps))
            for kind in KINDS:
                print(f"{kind:16}" + "".join(f"{step['step_share_s'][kind]:15.3f}" for step in steps.values()))
            print(f"{'step (wall)':16}" + "".join(f"{step['step_s']:15.3f}" for step in steps.values()))
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
