"""Compile the real train step for a GPU or TPU you do not have, and size it: what ``python -m gptjax.aot`` runs.

The step is the one :func:`gptjax.runs.start_run` runs on a mesh, lowered with abstract inputs for compile-only
devices: a TPU topology from libtpu, or NVIDIA GPUs from a target description (``gptjax/aot_targets/*.txtpb``)
through the CUDA PJRT plugin. Nothing runs; the compiled program gives the compiler's memory plan per device,
FLOPs where the backend reports them, and its HLO. The figures are XLA's estimates: without a device there is
no autotuning, and on GPU the allocator and cuDNN's workspace add to them.

Needs ``pip install "gptjax[aot]"`` (libtpu, the CUDA 12 PJRT plugin and nvcc's libdevice/ptxas).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from gptjax.atomic import atomic_file, check_overwrite
from gptjax.presets import ModelConfig, config_to_dict
from gptjax.training import TrainConfig

GiB = 1024**3
AOT_EXTRA = 'pip install "gptjax[aot]"'
# HBM per chip (Google Cloud's TPU system architecture pages), by the device_kind libtpu reports.
TPU_MEMORY = {"TPU v4": 32 * GiB, "TPU v5 lite": 16 * GiB, "TPU v5": 95 * GiB, "TPU v5p": 95 * GiB,
              "TPU v6 lite": 32 * GiB}
GPU_TARGETS = {"h100": "h100.txtpb", "h200": "h200.txtpb"}
# jax preallocates this share of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION changes it); what a
# program can use is at most that.
GPU_MEM_FRACTION = 0.75


class TargetError(ValueError):
    """A target that cannot be compiled for here; ``name`` is the target as given, the message says why."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Target:
    name: str  # as the user typed it
    platform: str  # "tpu", "gpu" or "cpu"
    devices: tuple
    device_kind: str
    device_memory_bytes: int | None  # the device's memory
    usable_memory_bytes: int | None  # what a jax program may use of it

    @property
    def n_devices(self) -> int:
        return len(self.devices)


def compile_train_step(target: str, cfg: ModelConfig, tcfg: TrainConfig, *, mesh: Mapping[str, int] | None = None,
                       dump_hlo: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Compile the train step of ``cfg`` and ``tcfg`` for ``target`` (``tpu-<topology>``, ``gpu-h100:<N>``,
    ``gpu-h200:<N>`` or ``cpu``) on ``mesh`` (axis sizes; None: data parallel over every device); the report
    as a dict (memory per device, whether it fits and what to try if not, FLOPs, compile time). ``dump_hlo``:
    also write the compiled HLO text there. Makes this process's jax CPU-only (compile-only targets need it)."""
    _only_cpu_backend()
    from gptjax import sharding
    from gptjax.model import abstract_params, param_count

    resolved = resolve_target(target)
    mesh_sizes = dict(mesh) if mesh is not None else {"data": resolved.n_devices}
    try:
        device_mesh = sharding.make_mesh(mesh_sizes, list(resolved.devices))
    except ValueError:
        spec = ",".join(f"{k}={v}" for k, v in mesh_sizes.items())
        raise ValueError(f"mesh {spec} does not match the target {target}, which has {resolved.n_devices} devices; "
                         f"make the axis sizes multiply to {resolved.n_devices}") from None
    try:
        sharding.check_batch_size(tcfg.batch_size, device_mesh)
    except ValueError as e:
        raise ValueError(f"batch_size {tcfg.batch_size}: {e}") from None
    if dump_hlo is not None:
        check_new_file(dump_hlo, "dump_hlo", overwrite)
    compiled, refusal, state_bytes, compile_s = _compile(cfg, tcfg, device_mesh)
    if compiled is None:
        per_device, attention, flops = _refused_sizes(refusal, state_bytes), "XLA attention", None
    else:
        hlo = compiled.as_text()
        if dump_hlo is not None:
            write_text(Path(dump_hlo), hlo)
        per_device = planned_sizes(compiled)
        attention, flops = _attention_kind(hlo, resolved, cfg, tcfg), _flops(compiled)
    usable = per_device.pop("usable", None) or resolved.usable_memory_bytes
    fits = None if usable is None else compiled is not None and per_device["peak"] <= usable
    return {
        "target": resolved.name,
        "platform": resolved.platform,
        "device_kind": resolved.device_kind,
        "devices": resolved.n_devices,
        "mesh": dict(device_mesh.shape),
        "model": config_to_dict(cfg),
        "parameters": param_count(abstract_params(cfg)),
        "batch_size": tcfg.batch_size,
        "grad_accum": tcfg.grad_accum,
        "tokens_per_step": tcfg.batch_size * tcfg.grad_accum * cfg.context_length,
        "dtype": tcfg.dtype,
        "remat": tcfg.remat,
        "per_device_bytes": per_device,
        "state_bytes_per_device": state_bytes,
        "device_memory_bytes": resolved.device_memory_bytes,
        "usable_memory_bytes": usable,
        "fits": fits,
        "advice": None if fits in (True, None) else _advice(per_device, state_bytes, usable, device_mesh, tcfg),
        "compiler_refusal": None if compiled is not None else refusal,
        "flops_per_step": flops,
        "attention": attention,
        "compile_s": round(compile_s, 2),
    }


def _compile(cfg: ModelConfig, tcfg: TrainConfig, mesh) -> tuple[Any, str | None, int, float]:
    """(the compiled step or None, the compiler's refusal when the program cannot fit, the parameters' and
    optimizer state's bytes per device, the seconds it took)."""
    import jax

    from gptjax import sharding
    from gptjax.training import make_optimizer, make_train_step, train_step_options

    optimizer = make_optimizer(tcfg, total_steps=1000)  # the schedule's length changes no shape
    jit_kwargs = sharding.train_step_jit_kwargs(mesh, cfg, optimizer, tcfg.grad_accum)
    step = make_train_step(cfg, optimizer, **train_step_options(tcfg), jit_kwargs=jit_kwargs, mesh=mesh)
    params, opt_state = sharding.abstract_state(cfg, optimizer, mesh)
    batch_shape = (tcfg.batch_size, cfg.context_length)
    if tcfg.grad_accum > 1:
        batch_shape = (tcfg.grad_accum, *batch_shape)
    tokens = jax.ShapeDtypeStruct(batch_shape, jax.numpy.int32, sharding=sharding.batch_sharding(mesh, tcfg.grad_accum))
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(mesh))
    start = time.perf_counter()
    lowered = step.lower(params, opt_state, (tokens, tokens), key)
    state_bytes = _per_device_bytes(params) + _per_device_bytes(opt_state)
    try:
        compiled, refusal = _on_a_deep_stack(lowered.compile), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses a program that cannot fit: its message gives the sizes.
        compiled, refusal = None, _first_line(e)
    return compiled, refusal, state_bytes, time.perf_counter() - start


def check_new_file(path: str | os.PathLike, what: str, overwrite: bool) -> None:
    """Refuse, before compiling, a ``what`` file that is a folder or (without ``overwrite``) exists."""
    if Path(path).is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    try:
        check_overwrite(path, overwrite)
    except ValueError as e:
        raise ValueError(f"{what} {e}") from None


def _on_a_deep_stack(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a thread with a 1 GiB stack: libtpu's compiler recurses deeper than the main thread's
    8 MiB allow on gpt2-xl (a SIGSEGV, "stack overflow", in its convolution-window costing); the pages
    are only reserved, not used."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            result["error"] = e

    old = threading.stack_size(1 << 30)
    try:
        thread = threading.Thread(target=target, name="gptjax-aot-compile")
        thread.start()
    finally:
        threading.stack_size(old)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def planned_sizes(compiled: Any) -> dict[str, int]:
    """A compiled program's memory plan per device in bytes, ``peak`` what it needs at once (the AOT report's
    figures; benchmarks/gpu_families.py sets a real device's peak beside it)."""
    mem = compiled.memory_analysis()
    b = {
        "arguments": int(mem.argument_size_in_bytes),
        "outputs": int(mem.output_size_in_bytes),
        "aliased": int(mem.alias_size_in_bytes),
        "temp": int(mem.temp_size_in_bytes),
        "generated_code": int(mem.generated_code_size_in_bytes),
    }
    # Donated parameters and optimizer state are updated in place: aliased outputs take no new memory.
    b["peak"] = b["arguments"] + b["outputs"] - b["aliased"] + b["temp"] + b["generated_code"]
    return b


def _refused_sizes(message: str, state_bytes: int) -> dict[str, int]:
    """Sizes from a compiler's out-of-memory refusal, e.g. '... HLO temporaries (20.60G) exceeds available
    HBM (15.75G)'; the arguments are the sharded state (the batch is negligible)."""
    def size(pattern: str) -> int | None:
        m = re.search(pattern + r"\s*\(([\d.]+)([KMGT])\)", message)
        return None if m is None else int(float(m[1]) * 1024 ** " KMGT".index(m[2]))

    temp = size(r"temporaries") or 0
    b = {"arguments": state_bytes, "outputs": state_bytes, "aliased": state_bytes, "temp": temp,
         "generated_code": 0, "peak": state_bytes + temp}
    if (usable := size(r"available HBM")) is not None:
        b["usable"] = usable
    return b


def _only_cpu_backend() -> None:
    """Compile-only targets need jax's own backend to be the CPU: with the CUDA plugin installed and no
    GPU, initialising it would fail. Set before any backend starts, in this entry point only."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    # libtpu lets one process at a time hold a TPU unless told otherwise; compiling holds none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")


def resolve_target(name: str) -> Target:
    """The compile-only devices of a target name (see :func:`compile_train_step`)."""
    import jax

    if name == "cpu":
        devices = tuple(jax.devices("cpu"))
        return Target(name, "cpu", devices, devices[0].device_kind, _host_memory(), _host_memory())
    kind, sep, spec = name.partition("-")
    if kind == "tpu" and sep and spec:
        _require(name, "libtpu", "libtpu, which compiles for TPUs,")
        topologies = _topologies(name)
        try:
            topo = topologies.get_topology_desc(spec, platform="tpu")
        except Exception as e:  # libtpu says what it did not accept
            raise TargetError(name, f"libtpu does not know topology {spec!r} ({_first_line(e)}); try e.g. "
                              "tpu-v5e:2x2, tpu-v4:2x2x1, tpu-v6e:2x2") from None
        devices = tuple(topo.devices)
        device_kind = devices[0].device_kind
        memory = TPU_MEMORY.get(device_kind)
        return Target(name, "tpu", devices, device_kind, memory, memory)
    if kind == "gpu" and sep:
        model, _, count = spec.partition(":")
        if model not in GPU_TARGETS or not count.isdigit() or int(count) < 1:
            raise TargetError(name, f"unknown target: expected gpu-<{'|'.join(GPU_TARGETS)}>:<number of GPUs>, "
                              "e.g. gpu-h100:8")
        text = target_description(model)
        _require(name, "jax_plugins.xla_cuda12", "the CUDA 12 PJRT plugin (jax-cuda12-plugin),")
        _require(name, "nvidia.cuda_nvcc", "CUDA's libdevice and ptxas (nvidia-cuda-nvcc-cu12),")
        topologies = _topologies(name)
        try:
            topo = topologies.get_topology_desc(platform="cuda", target_config=text, topology=f"1x1x{count}")
        except Exception as e:
            raise TargetError(name, f"the CUDA plugin cannot make compile-only GPUs ({_first_line(e)}); is "
                              f"{AOT_EXTRA} installed at jax's version?") from None
        devices = tuple(topo.devices)
        memory = int(re.search(r"device_memory_size:\s*(\d+)", text)[1])
        description = re.search(r'device_description_str:\s*"([^"]+)"', text)
        return Target(name, "gpu", devices, description[1] if description else model.upper(), memory,
                      int(memory * GPU_MEM_FRACTION))
    raise TargetError(name, f"unknown target: expected tpu-<topology> (e.g. tpu-v5e:2x2), "
                      f"gpu-<{'|'.join(GPU_TARGETS)}>:<N> (e.g. gpu-h200:4) or cpu")


def target_description(model: str) -> str:
    """The GpuTargetConfigProto text of a GPU model shipped with gptjax."""
    return resources.files("gptjax").joinpath("aot_targets", GPU_TARGETS[model]).read_text()


def _require(name: str, module: str, what: str) -> None:
    from importlib.util import find_spec

    try:
        found = find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        found = False
    if not found:
        raise TargetError(name, f"{what} is not installed; {AOT_EXTRA}")


def _topologies(name: str):
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover - part of jax itself
        raise TargetError(name, f"jax.experimental.topologies is missing ({e}); {AOT_EXTRA}") from None
    return topologies


def _per_device_bytes(tree: Any) -> int:
    import jax

    total = 0
    for x in jax.tree_util.tree_leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        n = 1
        for d in shard:
            n *= d
        total += n * x.dtype.itemsize
    return total


def _flops(compiled: Any) -> float | None:
    """FLOPs per step per device: the backend's cost analysis of the compiled program, or where it has
    none (the GPU compiler), XLA's HLO cost analysis of the compiled per-device module (jax has no
    public call for it, hence the guarded private one)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        cost = None
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    if flops is None:
        try:
            import jax
            from jax._src.lib import xla_client

            module = compiled.runtime_executable().hlo_modules()[0]
            flops = xla_client._xla.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module).get("flops")
        except Exception:
            return None
    return None if flops is None or flops < 0 else float(flops)


def _attention_kind(hlo: str, target: Target, cfg: ModelConfig, tcfg: TrainConfig) -> str:
    """Which attention the compiled program holds, and on a GPU why not cuDNN's flash attention."""
    if "__cudnn$fmha" in hlo:
        return "cuDNN flash attention"
    # GPT-2's model takes gptjax.attention's per-platform paths when it has no dropout; the families' models
    # (gptjax.gqa) have no dropout (their configs no drop_rate), so they always do.
    drop_rate = getattr(cfg, "drop_rate", 0.0)
    if target.platform == "cpu" and drop_rate == 0:
        return "blocked causal attention (gptjax.attention)"
    if target.platform != "gpu":
        return "XLA attention"
    if drop_rate > 0:
        return ("XLA attention (dropout on the attention weights, as in the book; with drop_rate 0 the "
                "GPU program gets cuDNN flash attention where cuDNN is installed)")
    from gptjax.attention import cudnn_attention_unavailable
    import jax
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if tcfg.dtype == "bfloat16" else jnp.float32
    q = jax.ShapeDtypeStruct((1, cfg.context_length, cfg.n_heads, cfg.head_dim), dtype)
    return f"XLA attention ({cudnn_attention_unavailable(q, q, q) or 'cuDNN attention was not used'})"


def _advice(per_device: dict, state_bytes: int, usable: int, mesh, tcfg) -> str:
    """What to try when the step does not fit: the compiler's plan does not say, so these are estimates."""
    tips = []
    fsdp, data = mesh.shape["fsdp"], mesh.shape["data"]
    if data > 1:
        tips.append(f"mesh data={data // 2},fsdp={fsdp * 2} (parameters and optimizer state split over more devices)"
                    if data % 2 == 0 else f"a mesh with more fsdp (now data={data},fsdp={fsdp})")
    if state_bytes > usable:
        tips.append(f"the parameters and AdamW state alone take {state_bytes / GiB:.1f} GiB per device: more devices "
                    "on fsdp")
    if not tcfg.remat:
        tips.append("remat (keeps only each block's input for the backward pass)")
    other = per_device["peak"] - per_device["temp"]
    if per_device["temp"] > 0 and other < usable and tcfg.batch_size > 1:
        # Activations (most of temp) grow with the batch; the rest does not.
        guess = int(tcfg.batch_size * (usable - other) / per_device["temp"])
        if 0 < guess < tcfg.batch_size:
            tips.append(f"a smaller batch_size (about {guess} by linear scaling of the temporaries), with "
                        "grad_accum to keep the tokens per step")
    return "; ".join(tips) if tips else "a larger target"


def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
