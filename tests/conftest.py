import os
from pathlib import Path

# Share XLA compiles across test modules and runs; keep tests on one CPU device unless a test
# module asks for more (the sharding tests run in their own subprocess).
_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "jax"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
