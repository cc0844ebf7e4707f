"""Test scripts under Triton's CPU interpreter, each in a process of its own: the switch must be set
before Triton is imported, and one process per script keeps the imports to one cost."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(script: str, timeout: float = 300) -> dict:
    """Run `script` with TRITON_INTERPRET=1 (kernels on CPU tensors); returns the JSON its last line prints."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
