"""Peak resident memory and time of ``gptjax.load_weights`` per weights format, at a GPT-2 size.

For each format a synthetic model of that size (random values, the real tensor names and shapes) is written
by that format's own writer in a subprocess, then loaded by ``load_weights`` in a fresh subprocess that
reports its peak resident set size (``ru_maxrss``), its size just before loading (imports done) and the
load time; then the files are deleted. Formats:

- ``openai``: OpenAI's TensorFlow checkpoint folder, written by TensorFlow (needs the ``tf`` extra);
- ``safetensors``: a Hugging Face folder with one ``model.safetensors`` (safetensors' writer);
- ``safetensors-sharded``: ``model.safetensors.index.json`` + 2 GB shards (huggingface_hub's writer);
- ``bin``: a Hugging Face folder with ``pytorch_model.bin`` (torch.save);
- ``pth``: the book's converted state dict, ``gpt2-xl-1558M.pth`` style (torch.save, with the att.mask buffers).

    python benchmarks/bench_load.py                          # gpt2-xl (1558M): ~6.5 GB of disk per format at a time
    python benchmarks/bench_load.py --size 124M --formats safetensors pth

The files were just written, so they are in the page cache: the times are warm-cache times (and, on a
shared machine, not meaningful); the memory figures do not depend on that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_info, print_table, write_json  # noqa: E402
from gptjax.config import GPTConfig, get_config  # noqa: E402
from gptjax.weights.book import MASK_SUFFIX, book_table  # noqa: E402
from gptjax.weights.hf import PREFIX, hf_config, hf_table  # noqa: E402
from gptjax.weights.mapping import Row, get_path  # noqa: E402
from gptjax.weights.openai import CKPT, HPARAMS, config_to_settings, openai_table  # noqa: E402

FORMATS = ("openai", "safetensors", "safetensors-sharded", "bin", "pth")
SIZES = ("124M", "355M", "774M", "1558M")
BOOK_NAMES = {"124M": "gpt2-small-124M", "355M": "gpt2-medium-355M", "774M": "gpt2-large-774M", "1558M": "gpt2-xl-1558M"}


def external_shapes(table: list[Row], cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor a format stores, from the table that maps it onto the gptjax tree."""
    from gptjax.model import abstract_params

    abstract = abstract_params(cfg)
    shapes = {}
    for row in table:
        want = tuple(get_path(abstract, row.path).shape)
        full = want if row.part is None else (*want[:-1], want[-1] * row.part[1])
        shapes[row.key] = tuple(reversed(full)) if row.transpose else full
    return shapes


def filled(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random-looking float32 values, cheaply: a 1 Mi-value random block repeated (values do not matter here)."""
    block = np.random.default_rng(seed).standard_normal(1 << 20, dtype=np.float32) * 0.02
    return np.resize(block, shape)


def write(fmt: str, size: str, folder: Path) -> Path:
    """Write the synthetic model in ``fmt`` under ``folder``; returns the path to load."""
    cfg = get_config(size)
    folder.mkdir(parents=True)
    if fmt == "openai":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        shapes = external_shapes(openai_table(cfg, head=False), cfg)
        shapes = {k: (1, *s) if k.endswith("/w") else s for k, s in shapes.items()}  # conv weights: [1, in, out]
        names = sorted(shapes)
        tensors = [tf.constant(filled(shapes[k], i)) for i, k in enumerate(names)]  # one numpy copy at a time
        tf.raw_ops.SaveV2(prefix=str(folder / CKPT), tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=tensors)
        (folder / "checkpoint").write_text(f'model_checkpoint_path: "{CKPT}"\n')
        (folder / HPARAMS).write_text(json.dumps(config_to_settings(cfg)))
        return folder
    if fmt == "pth":
        import torch

        shapes = external_shapes(book_table(cfg), cfg)
        state = {k: torch.from_numpy(filled(s, i)) for i, (k, s) in enumerate(shapes.items())}
        mask = torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1)
        state.update({f"trf_blocks.{i}{MASK_SUFFIX}": mask.clone() for i in range(cfg.n_layers)})
        path = folder / f"{BOOK_NAMES[size]}.pth"
        torch.save(state, path)
        return path
    shapes = {PREFIX + k: s for k, s in external_shapes(hf_table(cfg, lm_head=False), cfg).items()}
    arrays = {k: filled(s, i) for i, (k, s) in enumerate(shapes.items())}
    (folder / "config.json").write_text(json.dumps(hf_config(cfg, tied=True)))
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, folder / "model.safetensors", metadata={"format": "pt"})
    else:
        import torch

        state = {k: torch.from_numpy(v) for k, v in arrays.items()}
        if fmt == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            from huggingface_hub import save_torch_state_dict

            save_torch_state_dict(state, folder, max_shard_size="2GB")
    return folder


LOAD = """
import json, resource, sys, time
import jax
from gptjax.weights import load_weights
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
params, cfg = load_weights(sys.argv[1])
jax.block_until_ready(params)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      rss_before_load=before, params_bytes=sum(x.nbytes for x in jax.tree.leaves(params)))))
"""


def run(fmt: str, size: str, workdir: Path) -> dict:
    folder = workdir / fmt
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        made = subprocess.run([sys.executable, __file__, "--write", fmt, "--size", size, "--workdir", str(folder)],
                              capture_output=True, text=True, env=env)
        if made.returncode:
            return dict(format=fmt, size=size, error=f"writer exit {made.returncode}: {_last_error(made.stderr)}")
        path = Path(made.stdout.strip().splitlines()[-1])
        weights = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, env=env,
                             cwd=Path(__file__).resolve().parent.parent)
        if out.returncode:
            return dict(format=fmt, size=size, error=f"loader exit {out.returncode}: {_last_error(out.stderr)}")
        row = dict(format=fmt, size=size, weights_bytes=weights, **json.loads(out.stdout.strip().splitlines()[-1]))
        row["peak_over_weights"] = row["peak_rss"] / weights
        row["growth_over_weights"] = (row["peak_rss"] - row["rss_before_load"]) / weights
        return row
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _last_error(stderr: str) -> str:
    """The exception line of a child's stderr (a signal, say -9 when memory ran out, leaves none)."""
    lines = [line for line in stderr.splitlines() if line and not line.startswith((" ", "I0000", "W0000", "E0000"))]
    return lines[-1] if lines else "no error message"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="1558M", help="GPT-2 size (default 1558M, gpt2-xl)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic files go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    parser.add_argument("--write", choices=FORMATS, help=argparse.SUPPRESS)  # the writer subprocess
    args = parser.parse_args(argv)
    if args.write:
        print(write(args.write, args.size, args.workdir))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="bench_load-", dir=args.workdir))
    try:
        rows = []
        for fmt in args.formats:
            rows.append(run(fmt, args.size, workdir))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    gb = 1e9
    table = [{**r, **{k: r[k] / gb for k in ("weights_bytes", "peak_rss", "rss_before_load") if k in r}} for r in rows]
    print_table(table, [("format", "format", ""), ("size", "size", ""), ("weights_bytes", "weights GB", ".2f"),
                        ("rss_before_load", "RSS before GB", ".2f"), ("peak_rss", "peak RSS GB", ".2f"),
                        ("peak_over_weights", "peak/weights", ".2f"), ("seconds", "load s", ".1f"),
                        ("error", "error", "")])
    write_json(args.out, dict(machine=machine_info(), size=args.size, results=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
