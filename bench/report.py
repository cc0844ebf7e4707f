"""Where a bench's results go: its table printed, and OUT/<stem>.json (every logged row) plus
OUT/<stem>.md (the table) written, so the device call brings both back."""
from __future__ import annotations

import json
import os
import time


def save(out: str, stem: str, results: list[dict], md: str, md_name: str | None = None) -> None:
    print(md)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, md_name or f"{stem}.md"), "w") as f:
        f.write(md + "\n")


class Log:
    """A bench's rows: log(**row) prints it as one JSON line (with `t`, seconds since the start) and
    keeps it in `rows`, what `save` writes."""

    def __init__(self):
        self.rows: list[dict] = []
        self.t0 = time.time()

    def __call__(self, **row) -> None:
        row["t"] = round(time.time() - self.t0, 1)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
