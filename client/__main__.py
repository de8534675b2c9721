"""Talk to a fluxserve Triton server: generate an image, list models, load or unload a stack.

  python -m client --model bf16 --prompt "a red fox in snow" --seed 1 -o fox.png
  python -m client --protocol grpc --model bf16 --prompt "a red fox in snow" --steps 4 --height 512 --width 512
  python -m client --list
  python -m client --load bf16-fbcache-0.3        (explicit model-control mode)
  python -m client --unload bf16-fbcache-0.3

Server errors are printed as the server's message, exit code 1; usage errors exit with 2. When the server
has an admin key, --list, --load and --unload need it in FLUXSERVE_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import DEFAULT_URLS, LIMITS, PROTOCOLS, FluxClient, GenerateRequest, GenerateResult, InferenceServerException


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="http")
    parser.add_argument("--url", help=f"server address (default {DEFAULT_URLS['http']} for HTTP, "
                                      f"{DEFAULT_URLS['grpc']} for gRPC)")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the repository's models and their state")
    action.add_argument("--load", metavar="MODEL", help="load (or reload) a model and wait until it is ready")
    action.add_argument("--unload", metavar="MODEL", help="unload a model and wait until it is gone")
    action.add_argument("--prompt", help="generate an image from this prompt (needs --model)")
    parser.add_argument("--model", help="the stack to generate with, e.g. bf16")
    parser.add_argument("--seed", type=int, help="random seed (default: the server picks one)")
    parser.add_argument("--steps", type=int, default=LIMITS.default_steps)
    parser.add_argument("--guidance", type=float, default=LIMITS.default_guidance)
    parser.add_argument("--height", type=int, default=LIMITS.default_size)
    parser.add_argument("--width", type=int, default=LIMITS.default_size)
    parser.add_argument("-o", "--output", type=Path, default=Path("out.png"), help="where to save the PNG")
    parser.add_argument("--info", action="store_true", help="also print the full INFO telemetry as JSON")
    args = parser.parse_args(argv)
    if not (args.list or args.load or args.unload or args.prompt is not None):
        parser.error("give --prompt (with --model), --list, --load MODEL or --unload MODEL")
    if args.prompt is not None and not args.model:
        parser.error("--prompt needs --model")
    return args


def print_models(client: FluxClient) -> None:
    for model in client.models():
        reason = f"  ({model.reason})" if model.reason else ""
        print(f"{model.name:40s} {model.version or '-':>3s}  {model.state or 'NOT LOADED'}{reason}")


def print_telemetry(result: GenerateResult, output: Path) -> None:
    """The response's telemetry: where the image went, steps computed, latency and the attention kernel."""
    info = result.info
    print(f"saved {output} ({info['width']}x{info['height']}, seed {info['seed']})")
    print(f"model {info['model']} on {info['device']}, weights {info['weights']}")
    print(f"steps computed: {result.steps_computed} of {info['steps_total']}")
    print(f"latency: {info['latency_ms'] / 1000:.3f} s in the model, {result.latency_s:.3f} s at the client")
    print(f"attention kernel: {info['attention_kernel']}")
    for warning in info.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)


def run(args: argparse.Namespace) -> None:
    client = FluxClient(args.url, args.protocol)
    try:
        if args.list:
            print_models(client)
        elif args.load:
            print(f"loaded {args.load} in {client.load(args.load):.1f} s")
        elif args.unload:
            client.unload(args.unload)
            print(f"unloaded {args.unload}")
        else:
            request = GenerateRequest(args.prompt, args.seed, args.steps, args.guidance, args.height, args.width)
            result = client.generate(args.model, request)
            args.output.write_bytes(result.png)
            print_telemetry(result, args.output)
            if args.info:
                print(json.dumps(result.info, indent=2))
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except InferenceServerException as exc:
        print(f"error: {exc.message()}", file=sys.stderr)
        return 1
    except ConnectionError as exc:
        print(f"error: cannot reach the server at {args.url or DEFAULT_URLS[args.protocol]}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the output file cannot be written
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
