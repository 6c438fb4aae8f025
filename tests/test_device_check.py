"""The prepared GPU check stays runnable without a GPU: its script parses, its checks pass on the CPU's own
paths, and the book's fast torch attention that bench_train.py times against equals the book's."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def test_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")], check=True)


def test_device_checks_pass_on_cpu():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "benchmarks" / "device_checks.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 passed, 2 skipped" in proc.stdout  # cuDNN's checks need a GPU


def test_sdpa_attention_equals_the_books():
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_train import _sdpa_forward
    from tests.torch_reference import MultiHeadAttention

    torch.manual_seed(0)
    att = MultiHeadAttention(32, 32, context_length=16, dropout=0.1, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        np.testing.assert_allclose(_sdpa_forward(att)(x).numpy(), att(x).numpy(), atol=1e-5)
