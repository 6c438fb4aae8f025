"""Which jax platforms start: on a machine with no accelerator at all, only the CPU, so that jax starts quietly.

With ``JAX_PLATFORMS`` unset jax starts every platform it has a plugin for. The CUDA 12 plugin (installed by
the ``aot`` and ``dev`` extras, to compile GPU programs ahead of time) then runs its CUDA version check even
where no NVIDIA device exists: that check raises and jax logs it as a "plugin configuration error" traceback,
and libtpu (the same extras) prints its own warnings about the TPU it cannot find. Neither could start on such
a machine anyway, so asking jax for the CPU there (jax's own ``jax_platforms`` setting, which the CUDA plugin
also reads to skip its check) changes no result, only the noise.

Nothing is chosen where the user chose (``JAX_PLATFORMS`` set, even empty, or ``jax.config.jax_platforms``),
where jax's own hardware checks see an NVIDIA GPU, a TPU or an AMD GPU (its plugin starts as jax starts it, and
a failure is as loud as jax makes it), or where a jax plugin gptjax does not know is installed.
"""

from __future__ import annotations

import os
import sys

# The jax plugins whose hardware the checks below look for (jax_plugins.xla_cuda12, ..., xla_rocm7).
_KNOWN_PLUGINS = ("jax_plugins.xla_cuda", "jax_plugins.xla_rocm")


def start_present_platforms_only() -> None:
    """Set ``jax_platforms`` to ``cpu`` when this machine has no accelerator jax could use (see above)."""
    import jax

    if jax.config.jax_platforms is not None or os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
        return
    if sys.platform != "linux":  # the hardware checks read Linux's /dev and /sys
        return
    try:
        # The checks jax itself makes before it starts a CUDA backend or warns of a missing TPU or ROCm one.
        from jax._src import hardware_utils as hw

        accelerator = (hw.has_visible_nvidia_gpu() or hw.num_available_tpu_chips_and_device_id()[0] > 0
                       or hw.num_available_amd_gpus(stop_at=1) > 0)
    except (ImportError, AttributeError):  # a jax without them: leave the choice to jax
        return
    if not accelerator and not _unknown_plugins():
        jax.config.update("jax_platforms", "cpu")


def _unknown_plugins() -> bool:
    """Whether a jax plugin other than the CUDA and ROCm ones is installed, found as jax finds them."""
    import pkgutil
    from importlib.metadata import entry_points

    try:
        import jax_plugins
    except ImportError:
        names = set()
    else:
        names = {name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__, "jax_plugins.")}
    names |= {ep.value for ep in entry_points(group="jax_plugins")}
    return any(not name.startswith(_KNOWN_PLUGINS) for name in names)
