"""bench/e2e.py's after-drop report names what holds a tensor, and skips torch.compile's FakeTensors
(graph metadata with shapes but no memory, which the old report listed as the card's largest)."""
import os
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import e2e  # noqa: E402


class Holder:
    def __init__(self, t):
        self.records = {"ffn_out": [t]}


def test_report_walks_up_to_the_owner_and_skips_fakes():
    held = Holder(torch.empty(48, 2**20, dtype=torch.float32))  # 192 MiB: the largest CPU tensor here
    with FakeTensorMode():
        fake = torch.empty(64, 2**20)  # larger still, but no memory
    report = e2e.held_report("cpu", top=1)
    top, summary = report[0], report[-1]
    assert top["shape"] == [48, 2**20] and top["mib"] == 192.0
    assert top["held_by"][:3] == ["< list[1]", "<< dict{'ffn_out'}", "<<< test_bench_held.Holder"]
    assert summary["fake_tensors"] >= 1 and summary["gc_visible_gib"] >= 0.1875
    del held, fake
