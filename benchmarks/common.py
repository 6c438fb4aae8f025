"""Helpers shared by the benchmark scripts: machine description, peak FLOP/s, tables, atomic JSON."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.flops import PEAK_TFLOPS, peak_tflops


# Used only on accelerators; a CPU's peak is whatever measure_matmul_flops finds.
def datasheet_flops(device_kind: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s for a device kind (gptjax.flops.PEAK_TFLOPS, the table the training
    loop's MFU uses; the longest name contained in ``device_kind`` when it is not one of its keys)."""
    names = sorted((n for n in PEAK_TFLOPS if n.lower() in device_kind.lower()), key=len, reverse=True)
    name = device_kind if device_kind in PEAK_TFLOPS else (names[0] if names else None)
    peak = None if name is None else peak_tflops(name, "bfloat16")
    return None if peak is None else peak * 1e12


def measure_matmul_flops(dtype: Any = jnp.float32, n: int = 4096, repeats: int = 5) -> float:
    """The best FLOP/s of an [n, n] @ [n, n] matmul of ``dtype`` operands through XLA (default precision),
    accumulated and returned in float32 as the models' matmuls are (a bfloat16 result XLA:CPU widens to
    float32 first, and would report float32's rate)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    matmul(a, b).block_until_ready()
    best = min(timed(lambda: matmul(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best


def timed(fn: Callable[[], Any]) -> float:
    """Seconds that ``fn()`` takes; ``fn`` must wait for its own result (block_until_ready)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def machine_info() -> dict[str, Any]:
    """What ran the benchmark, including the load average: other processes skew CPU timings."""
    device = jax.devices()[0]
    info = dict(
        backend=device.platform,
        device_kind=device.device_kind,
        device_count=jax.device_count(),
        cpus=os.cpu_count(),
        processor=platform.processor() or platform.machine(),
        python=platform.python_version(),
        jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    if hasattr(os, "getloadavg"):
        info["load_average_1m_at_start"] = round(os.getloadavg()[0], 2)
    try:  # the CPU's model: Intel and AMD machines of this project time differently
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a table; ``columns`` are (key, header, format spec), None printed as '-'."""
    cells = [[("-" if r.get(k) is None else format(r[k], fmt)) for k, _, fmt in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    header = "  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))
    print(header + "\n" + "-" * len(header))
    for c in cells:
        print("  ".join(x.rjust(w) for x, w in zip(c, widths)))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
    return path
