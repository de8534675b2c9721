"""deploy/README.md's tables, printed by `--readme-tables`."""

from __future__ import annotations

from ..server.placement import format_instance
from .measurements import REFERENCE_STACK, measured_as, measurements
from .profiles import PROFILES, plan_for


def profile_table() -> str:
    """What each profile's pods run and need (a test keeps deploy/README.md in step)."""
    rows = ["| profile | nodes (`nvidia.com/gpu.product`) | GPUs / pod | models (instances per pod) | startup probe | "
            "queue-time target | memory / pod |", "|---|---|---|---|---|---|---|"]
    for profile in PROFILES:
        plan = plan_for(profile)
        models = "<br>".join(f"`{m.stack}` ({', '.join('GPU ' + format_instance(g) for g in m.instances)})"
                             for m in profile.models)
        rows.append(f"| `{profile.name}` | {', '.join(profile.products)} | {plan.gpus} | {models} | "
                    f"{plan.startup_s} s | {plan.queue_target_s:.2f} s | {plan.memory_gib} GiB |")
    return "\n".join(rows)


def expected_latency_table() -> str:
    """Per profile and model, the P50 to expect at 1024x1024, 28 steps, and what the number rests on."""
    measured = measurements()
    rows = ["| profile | model | expected P50 (s) | basis |", "|---|---|---|---|"]
    for profile in PROFILES:
        plan = plan_for(profile, measured)
        for stack in plan.stacks:
            twin = measured_as(stack)
            base = measured[twin]
            if profile.seed_bf16_p50_s:
                value = f"{base.p50_s * plan.slowdown:.2f}"
                basis = (f"estimate: `{twin}` on the H200, {base.p50_s:.2f} s, x {plan.slowdown:.2f} (the seed's "
                         f"BF16 on this GPU, {profile.seed_bf16_p50_s} s by hand, / the H200's served "
                         f"`{REFERENCE_STACK}`, {measured[REFERENCE_STACK].p50_s:.2f} s)")
            else:
                value = f"{base.p50_s:.2f}"
                basis = f"measured through Triton (P99 {base.p99_s:.2f} s)"
            if stack.parallel != "none":
                value = f"below {value}"
                basis = f"not measured (context parallel): its one-GPU twin's P50, {basis}"
            rows.append(f"| `{profile.name}` | `{stack.name}` | {value} | {basis} |")
    return "\n".join(rows)
