"""How the one-shot GPU diagnostics hand over their result: one JSON line on stdout, and the same object, indented,
in the file `--out` names (the device machine returns files written under $OUT)."""

from __future__ import annotations

import argparse
import json


def emit(report: dict, out: str | None) -> None:
    print(json.dumps(report), flush=True)
    if out:
        with open(out, "w") as file:
            json.dump(report, file, indent=1)


def repeated_run_arguments(module: str, doc: str | None, repeats: int = 10) -> argparse.ArgumentParser:
    """The arguments every timing diagnostic takes: how many repeats, and the file for the result."""
    parser = argparse.ArgumentParser(prog=f"python3 -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out")
    return parser
