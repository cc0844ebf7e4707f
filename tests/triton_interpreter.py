"""Triton on a CPU for the tests: scripts under its interpreter, each in a process of its own (the switch
must be set before Triton is imported, and one process per script keeps the imports to one cost), and
kernels built for sm_90 by its real compiler (`sm90_build`)."""
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


def sm90_build(fn, types: dict, constants: dict, num_warps: int = 4, num_stages: int = 3,
               odd: tuple[str, ...] = (), maxnreg: int | None = None, gluon: bool = False):
    """Triton's real compiler (with the ptxas its wheel ships) for sm_90, no GPU needed: what the
    interpreter cannot check (what may be used inside a kernel, MMA shapes, TMA) fails here. Like
    Triton's launcher, pointers and integers are marked divisible by 16, but for the names in `odd`.
    gluon: fn is a `gluon.jit` kernel."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as Source
    else:
        from triton.compiler import ASTSource as Source
    names = fn.arg_names
    sig = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constants and n not in odd and not sig[n].startswith(("tensordesc", "fp"))}
    src = Source(fn, sig, constexprs={(names.index(n),): v for n, v in constants.items()}, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
