"""The command line, `python -m fluxserve.deployment` (build/generate_deployment.py runs it): write deploy/,
check it (`--check`), or print deploy/README.md's tables (`--readme-tables`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __doc__ as OVERVIEW  # the package's docstring: the --help text
from .files import DEPLOY, differences, render_files, write
from .profiles import PROFILES
from .readme_tables import expected_latency_table, profile_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed deploy/ is out of date")
    parser.add_argument("--output", type=Path, default=DEPLOY)
    parser.add_argument("--readme-tables", action="store_true", help="print deploy/README.md's tables and exit")
    args = parser.parse_args(argv)
    if args.readme_tables:
        print(profile_table() + "\n\n" + expected_latency_table())
        return 0
    if args.check:
        drift = differences(args.output)
        print("\n".join(drift) or "deploy/ matches the profiles")
        return 1 if drift else 0
    write(args.output)
    print(f"wrote {len(render_files())} files for {len(PROFILES)} profiles to {args.output}")
    return 0
