"""What the diagnostics that load a stack in-process share: the options for the weights and the request they time,
and that request (the seed configuration's settings unless told otherwise)."""

from __future__ import annotations

import argparse
import os

from fluxserve.contract import GenerationRequest
from fluxserve.weights import ENV_VAR

PROMPT = "a lighthouse on a cliff at dusk"


def add_stacks_argument(parser: argparse.ArgumentParser, allowed: list[str], kind: str) -> None:
    """--stacks: a comma-separated list of catalog stacks, each one of `allowed` (`kind` says which, in errors)."""

    def stack_names(text: str) -> list[str]:
        names = text.split(",")
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"not a {kind} stack: {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        return names

    parser.add_argument("--stacks", type=stack_names, required=True, metavar="STACK,...",
                        help=f"{kind} stacks of the catalog")


def add_request_arguments(parser: argparse.ArgumentParser, requests: int) -> None:
    """--weights, --size, --steps and --requests (timed requests after the load, default `requests`)."""
    parser.add_argument("--weights", default=os.environ.get(ENV_VAR, "synthetic:full"))
    parser.add_argument("--size", type=int, default=1024, help="image height and width (default 1024)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--requests", type=int, default=requests,
                        help=f"timed requests after the load (default {requests})")


def request_from(args: argparse.Namespace) -> GenerationRequest:
    return GenerationRequest(prompt=PROMPT, seed=0, steps=args.steps, guidance=3.5, height=args.size,
                             width=args.size)
