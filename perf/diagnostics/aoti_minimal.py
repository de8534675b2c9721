"""The smallest AOTInductor round trip, independent of the project: export Linear+ReLU on the GPU, compile it into a
package with torch._inductor.aoti_compile_and_package, then load and run the package in a fresh child process
(where a crash of the loader shows as a signal). Says whether this host's torch can use AOTInductor packages at all.

    python3 -m perf.diagnostics.aoti_minimal --out $OUT/aoti_minimal.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LOAD = """
import sys, torch
package = torch._inductor.aoti_load_package(sys.argv[1])
print("loaded", flush=True)
print(tuple(package(torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)).shape), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m perf.diagnostics.aoti_minimal", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    args = parser.parse_args()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).cuda().bfloat16()
    example = torch.randn(8, 64, device="cuda", dtype=torch.bfloat16)
    path = Path(tempfile.mkdtemp()) / "linear_relu.pt2"
    started = time.perf_counter()
    torch._inductor.aoti_compile_and_package(torch.export.export(model, (example,)), package_path=str(path))
    build_s = round(time.perf_counter() - started, 3)
    child = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=300)
    report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
              "build_s": build_s, "package_bytes": path.stat().st_size, "load_exit_code": child.returncode,
              "load_stdout": child.stdout.strip().splitlines(), "load_stderr_tail": child.stderr.strip().splitlines()[-8:]}
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
