"""bench/int8_gluon.py's kernel, built for sm_90a on the CPU (Triton's compiler and the ptxas and
nvdisasm its wheel ships): the overlap it exists for is in the machine code. ptxas moves or adds
warpgroup waits on its own (see the bench's docstring), so the PTX order proves nothing."""
import os
import re
import subprocess
import tempfile

import pytest
from triton_interpreter import sm90_build

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.language.nvidia.hopper")


def build(stages: int):
    from triton.experimental.gluon import language as gl

    from bench import int8_gluon
    lay = gl.NVMMASharedLayout.get_default_for
    types = {"q_desc": f"tensordesc<i8[64,128],{lay([64, 128], gl.int8)}>",
             "k_desc": f"tensordesc<i8[128,128],{lay([128, 128], gl.int8)}>",
             "v_desc": f"tensordesc<fp8e4nv[128,128],{lay([128, 128], gl.float8e4nv)}>",
             "QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "VM": "*fp32", "O": "*bf16"}
    return sm90_build(int8_gluon.attn_fwd, types, dict(D=128, BM=64, BN=128, STAGES=stages, num_warps=4),
                      maxnreg=168, gluon=True)


def tool(name: str) -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        pytest.skip(f"{name} is not in this Triton wheel")
    return path


@pytest.mark.parametrize("stages", [1, 2])
def test_softmax_runs_under_the_pv_product(stages):
    kernel = build(stages)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        info = subprocess.run([tool("ptxas"), "--gpu-name", "sm_90a", "-v", ptx, "-o", cubin],
                              capture_output=True, text=True).stderr
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    assert "C7514" not in info, info  # ptxas did not serialize the wgmmas
    # In the key loop: after the wait that leaves P·V_{j-1} running (LE 1), the softmax's 64 exps a
    # thread come before the wait for it (LE 0).
    ops = re.findall(r"(WARPGROUP\.DEPBAR\.LE gsb0, 0x[01]|MUFU\.EX2)", sass)
    windows = []
    for i, op in enumerate(ops):
        if op.endswith("0x1"):
            end = next((k for k in range(i + 1, len(ops)) if ops[k].startswith("WARPGROUP")), len(ops))
            windows.append(sum(o == "MUFU.EX2" for o in ops[i + 1:end]))
    assert windows and max(windows) >= 64, windows
