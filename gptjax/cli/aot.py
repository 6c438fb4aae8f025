"""``python -m gptjax.aot``: compile the real train step for a GPU or TPU you do not have, and size it.

Every flag but ``--target``, ``--json``, ``--dump-hlo`` and ``--overwrite`` is ``python -m gptjax.train``'s,
parsed by the same code in :mod:`gptjax.cli`; the compiling is :mod:`gptjax.aot_compile`'s. ``--preset`` takes
any family's preset (:func:`gptjax.presets.model_preset`: ``gpt2-xl``, ``qwen3-0.6b``, ``llama-3.2-1b``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gptjax import cli
from gptjax.aot_compile import GiB, TargetError, check_new_file, compile_train_step, write_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gptjax.aot",
        description="Compile the train step of 'python -m gptjax.train' for a TPU or GPU target (no device "
        "needed) and report its memory per device, whether it fits, FLOPs per step and compile time.",
        argument_default=argparse.SUPPRESS,
    )
    t = p.add_argument_group("target")
    t.add_argument("--target", required=True, metavar="NAME",
                   help="tpu-<topology> (any topology libtpu accepts, e.g. tpu-v5e:2x2, tpu-v5e:2x4, tpu-v4:2x2x1, "
                   "tpu-v5p:2x2x1, tpu-v6e:2x2), gpu-h100:<N> or gpu-h200:<N> (N GPUs on one node), or cpu "
                   "(this machine's CPU devices, to compare with a real run)")
    t.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE (default: none)")
    t.add_argument("--dump-hlo", metavar="FILE", help="write the compiled module's HLO text to FILE (default: none)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --json or --dump-hlo file "
                   "(default: refuse)")
    cli.add_model_flags(p, init_from=False)
    g = p.add_argument_group("batch")
    cli.add_batch_flags(g)
    s = p.add_argument_group("train step")
    cli.add_step_flags(s)
    v = p.add_argument_group("devices")
    cli.add_mesh_flag(v)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    try:
        report = run(args)
    except TargetError as e:
        return cli.fail(f"--target {e.name}: {e}")
    except (ValueError, OSError) as e:
        return cli.fail(e)
    print(format_report(report))
    if "json" in args:
        write_text(Path(args["json"]), json.dumps(report, indent=2) + "\n")
    return 0


def run(args: dict[str, Any]) -> dict[str, Any]:
    """Compile the train step the flags describe for ``--target``; the report, its advice in the flags' terms."""
    from gptjax.sharding import parse_mesh

    cfg, tcfg = cli.model_config(args), cli.train_config(args)
    if "json" in args:
        check_new_file(args["json"], "--json", args.get("overwrite", False))
    report = compile_train_step(args["target"], cfg, tcfg, mesh=parse_mesh(args["mesh"]) if "mesh" in args else None,
                                dump_hlo=args.get("dump_hlo"), overwrite=args.get("overwrite", False))
    for key in ("advice", "attention"):
        if report[key] is not None:
            report[key] = cli.error_line(report[key])
    return report


def format_report(r: dict[str, Any]) -> str:
    b = r["per_device_bytes"]

    def gib(n: int | None) -> str:
        return "unknown" if n is None else f"{n / GiB:.2f} GiB"

    lines = [
        f"target {r['target']}: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        f"model: {r['parameters']:,} parameters, context {r['model']['context_length']}; batch {r['batch_size']}"
        f" x grad-accum {r['grad_accum']} ({r['tokens_per_step']:,} tokens per step), {r['dtype']}"
        f"{', remat' if r['remat'] else ''}",
        f"compiled in {r['compile_s']:.1f} s; {r['attention']}",
        "per device (XLA's estimate, no autotuning):",
        f"  parameters + optimizer state  {gib(r['state_bytes_per_device'])}",
        f"  arguments {gib(b['arguments'])}, outputs {gib(b['outputs'])} ({gib(b['aliased'])} of them updated in place)",
        f"  temporaries                   {gib(b['temp'])}",
        f"  estimated peak                {gib(b['peak'])}",
        f"  device memory                 {gib(r['device_memory_bytes'])}"
        + (f" (a jax program may use {gib(r['usable_memory_bytes'])}: XLA_PYTHON_CLIENT_MEM_FRACTION 0.75)"
           if r["platform"] == "gpu" else ""),
        "FLOPs per step: " + ("not reported by this backend" if r["flops_per_step"] is None
                              else f"{r['flops_per_step']:.3e} per device"),
    ]
    if r["fits"] is None:
        lines.append("verdict: unknown (the device's memory is not known)")
    elif r["fits"]:
        lines.append(f"verdict: fits ({b['peak'] / r['usable_memory_bytes']:.0%} of usable memory)")
    else:
        if r["compiler_refusal"]:
            lines.append(f"the compiler refused the program: {r['compiler_refusal']}")
        lines.append(f"verdict: does not fit ({b['peak'] / r['usable_memory_bytes']:.0%} of usable memory); "
                     f"try {r['advice']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
