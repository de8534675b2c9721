"""How the one-shot GPU diagnostics hand over their result: one JSON line on stdout, and the same object, indented,
in the file `--out` names (the device machine returns files written under $OUT)."""

from __future__ import annotations

import json


def emit(report: dict, out: str | None) -> None:
    print(json.dumps(report), flush=True)
    if out:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)
