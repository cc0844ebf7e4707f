"""Where a bench's results go: its table printed, and OUT/<stem>.json (every logged row) plus
OUT/<stem>.md (the table) written, so the device call brings both back."""
from __future__ import annotations

import json
import os


def save(out: str, stem: str, results: list[dict], md: str, md_name: str | None = None) -> None:
    print(md)
    with open(os.path.join(out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, md_name or f"{stem}.md"), "w") as f:
        f.write(md + "\n")
