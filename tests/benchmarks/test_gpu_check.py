"""``benchmarks/gpu_check.py`` on a machine without CUDA: one line, status 0 (its
measurements need a GPU; ``--allow-cpu`` checks its code paths by hand)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="measures when CUDA is there")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"gpu_check: no CUDA device (torch {torch.__version__}); nothing to measure"
    )
    assert proc.stderr == ""
