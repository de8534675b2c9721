"""Generate `deploy/`: Kubernetes manifests for fluxserve, one profile per GPU type, from the stack catalog.

Like `model_repository/` (fluxserve/repository.py), the manifests are generated and committed, and a test fails
when they drift from what this module writes. A profile (`PROFILES`) says which GPU nodes it runs on, which
stacks a pod serves and on which of its GPUs; everything else is derived: the GPUs and memory a pod requests, its
startup probe (from the cold loads measured in perf/results/h200: results.csv and the served cold starts with the
load's warm-up, */cold-start*/loads.json), the autoscaler's queue-time target
(from the measured latency), the ports (the launcher's defaults) and the Locust job's models.

Each profile folder is a Kustomize directory (`kubectl apply -k deploy/<profile>`) whose kustomization.yaml only
lists complete manifests, without patches: what the tests validate offline is exactly what gets applied, and a
site's own overlay (image, namespace, storage classes) goes on top (deploy/README.md).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .contract import ADMIN_KEY_ENV, Limits
from .server.placement import Placement, check_placement, format_instance
from .serve import server_command
from .shared_dirs import COMPILE_CACHE_ENV
from .stacks import Stack, catalog_by_name
from .weights import ENV_VAR as WEIGHTS_ENV

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
GENERATOR = "python build/generate_deployment.py"
HAND_WRITTEN = ("README.md",)  # files under deploy/ that the generator leaves alone

# The measurements every derived number comes from: served rows of one H200 (perf/results/h200/README.md).
RESULTS_DIR = ROOT / "perf" / "results" / "h200"
RESULTS_CSV = RESULTS_DIR / "results.csv"
REFERENCE_STACK = "bf16"  # the stack whose latency scales the H200's numbers to another GPU

# The image (build/Dockerfile): its CMD runs this launcher from this folder; a site's overlay sets the registry.
IMAGE = "fluxserve"
IMAGE_WORKDIR = "/opt/fluxserve"
LAUNCHER = ("python3", "-m", "fluxserve.serve")
# Triton's P50/P99 per model for the dashboard (nv_inference_request_summary_us), passed through to tritonserver.
# One model loads at a time: each load holds its bf16 weights before quantizing (45-49 GiB on the H200), and three
# loading at once on one GPU ran out of memory (perf/results/h200/s12-specialised-sizes); the startup probe sums
# the loads accordingly.
TRITON_FLAGS = ("--metrics-config=summary_latencies=true", "--model-load-thread-count=1")

# Ports: the launcher's defaults (fluxserve/serve.py), never restated here.
_LAUNCHER_DEFAULTS = inspect.signature(server_command).parameters
HTTP_PORT = _LAUNCHER_DEFAULTS["http_port"].default
GRPC_PORT = _LAUNCHER_DEFAULTS["grpc_port"].default
METRICS_PORT = _LAUNCHER_DEFAULTS["metrics_port"].default
EXIT_TIMEOUT_S = _LAUNCHER_DEFAULTS["exit_timeout_s"].default

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on each GPU node by NVIDIA's GPU feature discovery
GPU_RESOURCE = "nvidia.com/gpu"
ADMIN_SECRET = ("fluxserve-admin-key", "admin-key")  # Secret name and key, created by hand (deploy/README.md)
HF_TOKEN_SECRET = ("hf-token", "token")
WEIGHTS_CLAIM = "flux1-dev-weights"
WEIGHTS_MOUNT = "/weights"
WEIGHTS_FOLDER = f"{WEIGHTS_MOUNT}/FLUX.1-dev"
FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"
# The single-file checkpoints at the repository's top level, which a diffusers-format load does not read (35 GB).
FLUX_DEV_UNUSED_FILES = ("flux1-dev.safetensors", "ae.safetensors")
COMPILE_CACHE_MOUNT = "/var/cache/fluxserve"
RESULTS_CLAIM = "fluxserve-locust-results"
RESULTS_MOUNT = "/results"
MONITORING_NAMESPACE = "monitoring"  # where Prometheus runs (kube-prometheus-stack's usual namespace)
PROMETHEUS_URL = f"http://prometheus-operated.{MONITORING_NAMESPACE}.svc:9090"
INSTANCE_LABEL = "app.kubernetes.io/instance"  # copied onto the metrics by the PodMonitor, for the autoscaler
UID = 1000  # any non-root id: the image's files are world-readable, writes go to volumes

# Startup: weights are read from the volume once per node, then from the page cache. 34 GB at 200 MB/s, a
# conservative network-volume rate; then each instance's measured cold load (compile caches empty, so the first
# pod fills them), scaled to the GPU by the reference stack's latency, times a margin.
FLUX_DEV_BYTES = 34e9
VOLUME_READ_BYTES_PER_S = 200e6
LOAD_MARGIN = 2.0
PROBE_PERIOD_S = 10
IMAGE_PULL_S = 900  # the image is tens of GB (NGC Triton + torch): first pull on a node
HPA_MAX_PERIOD_S = 1800
PRE_STOP_S = 10  # endpoints drop a terminating pod before Triton stops taking requests
GRACE_SLACK_S = 20

# Memory. GPU: each instance holds its own weights; a GPU's instances (measured peak, plus a CUDA context each)
# must fit in this fraction of it. Host: from_pretrained builds the pipeline in host memory before moving it to
# the GPU, one checkpoint per weight copy (each GPU of a context-parallel instance holds one), plus the server.
GPU_MEMORY_FRACTION = 0.9
CUDA_CONTEXT_GIB = 1.0
HOST_GIB_PER_WEIGHT_COPY = 40
HOST_BASE_GIB = 8
CPUS_PER_GPU = 8  # torch.compile's Inductor compiles in parallel processes at load
# /dev/shm: the Python backend passes each request's tensors through shared memory; the largest response is an
# IMAGE and its PNG at the contract's maximum size. This many of them per instance, at least the floor.
SHM_RESPONSES_PER_INSTANCE = 8
SHM_FLOOR_GIB = 1

YAML_HEADER = f"# Generated by `{GENERATOR}` from fluxserve/deployment.py: do not edit.\n"


class ProfileError(ValueError):
    """A profile that cannot be deployed: unknown stack, a stack on a GPU below its compute capability, a GPU
    over-committed."""


@dataclass(frozen=True)
class Measurement:
    """A served row of results.csv (seconds, GiB)."""

    p50_s: float
    p99_s: float
    load_s: float
    peak_gib: float


def measurements(path: Path = RESULTS_CSV) -> dict[str, Measurement]:
    """Served rows by stack name."""
    with path.open(newline="") as file:
        return {
            row["name"]: Measurement(float(row["p50_s"]), float(row["p99_s"]), float(row["load_s"]),
                                     float(row["peak_memory_gib"]))
            for row in csv.DictReader(file) if row["mode"] == "server"
        }


def cold_start_loads(results: Path = RESULTS_DIR) -> dict[str, float]:
    """Seconds each stack took to load in a served cold start (empty compile caches, every warm-up size compiled and
    graphed: what the first pod on an empty cache volume does), the slowest of every run that measured it
    (`perf/fresh_starts.sh` writes loads.json)."""
    loads: dict[str, float] = {}
    for path in results.glob("*/cold-start*/loads.json"):
        for model, load in json.loads(path.read_text()).items():
            loads[model] = max(loads.get(model, 0.0), float(load["load_seconds"]))
    return loads


def startup_load_s(stack: Stack, measured: dict[str, Measurement], cold: dict[str, float]) -> float:
    """The load a stack's startup probe must allow: its served cold start where one was measured; else, for a stack
    that compiles or captures CUDA graphs, whose warm-up at every size the loads in results.csv predate, the slowest
    cold start measured; else its load in results.csv (by its one-GPU twin for a context-parallel stack)."""
    name = measured_as(stack)
    if name in cold:
        return cold[name]
    if (stack.compile != "none" or stack.cuda_graph) and cold:
        return max(measured[name].load_s, *cold.values())
    return measured[name].load_s


def measured_as(stack: Stack) -> str:
    """The measured stack that stands for `stack`: itself, or for a context-parallel stack (not yet measured on
    GPUs) its one-GPU twin, whose weights each of its GPUs holds and whose load each of its workers repeats."""
    if stack.parallel == "none":
        return stack.name
    return dataclasses.replace(stack, parallel="none", parallel_degree=1).name


@dataclass(frozen=True)
class Model:
    """A stack a pod serves, and its instances: each a tuple of the pod's GPU ids (the launcher's `--gpus`)."""

    stack: str
    instances: Placement


@dataclass(frozen=True)
class GpuProfile:
    """One GPU type: the nodes it runs on, what a pod serves there, how far the autoscaler may go."""

    name: str
    gpu: str
    products: tuple[str, ...]  # values of nvidia.com/gpu.product
    memory_gib: float  # per GPU, as nvidia-smi reports it
    compute_capability: tuple[int, int]
    models: tuple[Model, ...]  # the first is the throughput model: the autoscaler's target is its latency
    # The seed benchmark's BF16 P50 on this GPU (by hand, without a server); None where results.csv measured it.
    seed_bf16_p50_s: float | None
    max_replicas: int = 4


def on_every_gpu(stack: str, gpus: int) -> Model:
    return Model(stack, tuple((gpu,) for gpu in range(gpus)))


def over_gpus(stack: str, gpus: int) -> Model:
    return Model(stack, (tuple(range(gpus)),))


FASTEST = "bf16-cudnn-fp8row-fusedqkv-compile-regional-cudagraph"  # fastest uncached stack measured (fp8 linear layers)
FASTEST_WITHOUT_FP8 = "bf16-compile-regional"

# Two GPUs per pod: the throughput stack on each GPU, and a context-parallel stack over both for lower latency
# per image (the DESIGN probe: Ulysses scales well to 2 GPUs, poorly past); on the H200's 141 GB also the
# fastest step cache measured. 80 GB GPUs hold two stacks each, so the A100 has no room for a third.
PROFILES: tuple[GpuProfile, ...] = (
    GpuProfile(
        name="a100-80gb", gpu="NVIDIA A100 80GB", products=("NVIDIA-A100-SXM4-80GB",), memory_gib=80.0,
        compute_capability=(8, 0), seed_bf16_p50_s=15.66,
        models=(on_every_gpu(FASTEST_WITHOUT_FP8, 2), over_gpus("bf16-cp2", 2)),
    ),
    GpuProfile(
        name="h100-80gb", gpu="NVIDIA H100 80GB HBM3", products=("NVIDIA-H100-80GB-HBM3",), memory_gib=79.6,
        compute_capability=(9, 0), seed_bf16_p50_s=7.09,
        models=(on_every_gpu(FASTEST, 2), over_gpus(f"{FASTEST}-cp2", 2)),
    ),
    GpuProfile(
        name="h200", gpu="NVIDIA H200", products=("NVIDIA-H200",), memory_gib=140.4,
        compute_capability=(9, 0), seed_bf16_p50_s=None,
        models=(on_every_gpu(FASTEST, 2), over_gpus(f"{FASTEST}-cp2", 2),
                on_every_gpu("bf16-taylorseer-interval5", 2)),
    ),
)


@dataclass(frozen=True)
class Plan:
    """What a profile's pods need, derived and checked (`plan_for`)."""

    profile: GpuProfile
    stacks: tuple[Stack, ...]
    gpus: int  # per pod
    weight_copies: int  # one per GPU of each instance
    slowdown: float  # this GPU's latency over the H200's, for the reference stack
    startup_s: int
    queue_target_s: float
    memory_gib: int
    shm_gib: int

    @property
    def name(self) -> str:
        return f"fluxserve-{self.profile.name}"

    @property
    def grace_s(self) -> int:
        return PRE_STOP_S + EXIT_TIMEOUT_S + GRACE_SLACK_S


def plan_for(profile: GpuProfile, measured: dict[str, Measurement] | None = None,
             cold: dict[str, float] | None = None) -> Plan:
    """Check `profile` against the catalog, the GPU and the measurements, and derive what its pods need."""
    measured = measurements() if measured is None else measured
    cold = cold_start_loads() if cold is None else cold
    catalog = catalog_by_name()
    unknown = [model.stack for model in profile.models if model.stack not in catalog]
    if unknown:
        raise ProfileError(f"profile {profile.name}: not in the catalog: {', '.join(unknown)}")
    stacks = tuple(catalog[model.stack] for model in profile.models)
    beyond_gpu = [stack for stack in stacks
                  if stack.capability_need and profile.compute_capability < stack.capability_need.capability]
    if beyond_gpu:
        capability = ".".join(map(str, profile.compute_capability))
        raise ProfileError(f"profile {profile.name}: {profile.gpu} (compute capability {capability}) cannot load "
                           + "; ".join(f"{stack.name}: {stack.capability_need}" for stack in beyond_gpu))
    for model, stack in zip(profile.models, stacks):
        check_placement(model.instances, stack.gpus, stack.name)
        if measured_as(stack) not in measured:
            raise ProfileError(f"profile {profile.name}: {stack.name} has no measured load in {RESULTS_CSV.name} "
                               f"(nor its one-GPU twin): its startup probe cannot be sized")
    used = sorted({gpu for model in profile.models for gpus in model.instances for gpu in gpus})
    if used != list(range(len(used))):
        raise ProfileError(f"profile {profile.name}: GPUs {used} are not 0..N-1, the ids a pod's N GPUs have")
    for gpu in used:
        on_gpu = [stack for model, stack in zip(profile.models, stacks) for gpus in model.instances if gpu in gpus]
        need = sum(measured[measured_as(stack)].peak_gib + CUDA_CONTEXT_GIB for stack in on_gpu)
        if need > GPU_MEMORY_FRACTION * profile.memory_gib:
            raise ProfileError(f"profile {profile.name}: GPU {gpu} needs {need:.1f} GiB for "
                               f"{', '.join(s.name for s in on_gpu)}; {GPU_MEMORY_FRACTION:.0%} of "
                               f"{profile.memory_gib} GiB is the most it may hold")
    reference = measured[REFERENCE_STACK].p50_s
    slowdown = profile.seed_bf16_p50_s / reference if profile.seed_bf16_p50_s else 1.0
    loads = sum(startup_load_s(stack, measured, cold) for model, stack in zip(profile.models, stacks)
                for _ in model.instances)
    startup = FLUX_DEV_BYTES / VOLUME_READ_BYTES_PER_S + LOAD_MARGIN * slowdown * loads
    instances = sum(len(model.instances) for model in profile.models)
    weight_copies = sum(len(gpus) for model in profile.models for gpus in model.instances)
    response_bytes = 2 * 3 * Limits().max_pixels  # IMAGE (RGB) and IMAGE_PNG at most as large
    shm_gib = max(SHM_FLOOR_GIB, math.ceil(instances * SHM_RESPONSES_PER_INSTANCE * response_bytes / 2**30))
    return Plan(
        profile=profile, stacks=stacks, gpus=len(used), weight_copies=weight_copies, slowdown=slowdown,
        startup_s=math.ceil(startup / PROBE_PERIOD_S) * PROBE_PERIOD_S,
        queue_target_s=round(measured[measured_as(stacks[0])].p50_s * slowdown, 2),
        memory_gib=HOST_BASE_GIB + HOST_GIB_PER_WEIGHT_COPY * weight_copies + shm_gib, shm_gib=shm_gib,
    )


# --- Kubernetes objects ---------------------------------------------------------------------------------------

def labels(plan: Plan, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "fluxserve", INSTANCE_LABEL: plan.name, "app.kubernetes.io/component": component}


POD_SECURITY = {
    "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
    "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
}
# With a read-only root: home, caches and temporary files on an emptyDir.
SCRATCH_ENV = [{"name": "HOME", "value": "/tmp/home"}, {"name": "XDG_CACHE_HOME", "value": "/tmp/cache"}]
SCRATCH_VOLUME = {"name": "tmp", "emptyDir": {}}
SCRATCH_MOUNT = {"name": "tmp", "mountPath": "/tmp"}


def pod_spec(containers: list[dict], volumes: list[dict], **fields) -> dict:
    """A pod that runs as a non-root user, without a service-account token (it calls no Kubernetes API)."""
    return {"automountServiceAccountToken": False, "securityContext": POD_SECURITY, **fields,
            "containers": containers, "volumes": [*volumes, SCRATCH_VOLUME]}


def container(name: str, env: list[dict], mounts: list[dict], resources: dict, **fields) -> dict:
    return {"name": name, "image": IMAGE, **fields, "env": [*env, *SCRATCH_ENV], "resources": resources,
            "securityContext": CONTAINER_SECURITY, "volumeMounts": [*mounts, SCRATCH_MOUNT]}


def gpus_flag(model: Model) -> str:
    return f"{model.stack}=" + ",".join(format_instance(gpus) for gpus in model.instances)


def server_args(plan: Plan) -> list[str]:
    """The container's command line: the image's launcher, on every address (so the admin key is required)."""
    placements = [part for model in plan.profile.models for part in ("--gpus", gpus_flag(model))]
    return [*LAUNCHER, "--address", "0.0.0.0", "--models", ",".join(s.name for s in plan.stacks), *placements,
            "--", *TRITON_FLAGS]


def http_probe(path: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period_s, "timeoutSeconds": 5,
            "failureThreshold": failures}


def deployment(plan: Plan) -> dict:
    """The server: the profile's stacks on its GPU nodes, ready once every stack is loaded and warmed up."""
    selector = labels(plan, "server")
    server = container(
        "fluxserve",
        env=[
            {"name": WEIGHTS_ENV, "value": WEIGHTS_FOLDER},
            {"name": ADMIN_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET[0], "key": ADMIN_SECRET[1]}}},
            {"name": COMPILE_CACHE_ENV, "value": f"{COMPILE_CACHE_MOUNT}/inductor"},
            {"name": "HF_HUB_OFFLINE", "value": "1"},
        ],
        mounts=[
            {"name": "weights", "mountPath": WEIGHTS_MOUNT, "readOnly": True},
            {"name": "compile-cache", "mountPath": COMPILE_CACHE_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        resources={
            "requests": {GPU_RESOURCE: plan.gpus, "cpu": CPUS_PER_GPU * plan.gpus, "memory": f"{plan.memory_gib}Gi"},
            "limits": {GPU_RESOURCE: plan.gpus, "memory": f"{plan.memory_gib}Gi"},
        },
        args=server_args(plan),
        ports=[{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT},
               {"name": "metrics", "containerPort": METRICS_PORT}],
        startupProbe=http_probe("/v2/health/ready", PROBE_PERIOD_S, plan.startup_s // PROBE_PERIOD_S),
        readinessProbe=http_probe("/v2/health/ready", PROBE_PERIOD_S, 3),
        livenessProbe=http_probe("/v2/health/live", 20, 6),
        lifecycle={"preStop": {"exec": {"command": ["sleep", str(PRE_STOP_S)]}}},
    )
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": plan.name, "labels": selector},
        "spec": {
            "selector": {"matchLabels": selector},
            # A new pod takes minutes to load: never take one away before its replacement is ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": plan.startup_s + IMAGE_PULL_S,
            "template": {
                "metadata": {"labels": selector},
                "spec": pod_spec(
                    [server],
                    [
                        {"name": "weights", "persistentVolumeClaim": {"claimName": WEIGHTS_CLAIM, "readOnly": True}},
                        {"name": "compile-cache", "persistentVolumeClaim": {"claimName": f"{plan.name}-compile-cache"}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{plan.shm_gib}Gi"}},
                    ],
                    terminationGracePeriodSeconds=plan.grace_s,
                    affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                        {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In",
                                               "values": list(plan.profile.products)}]}]}}},
                    tolerations=[{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
                    topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                                "whenUnsatisfiable": "ScheduleAnyway",
                                                "labelSelector": {"matchLabels": selector}}],
                ),
            },
        },
    }


def service(plan: Plan) -> dict:
    """Inference (and the admin-key-guarded control API) inside the cluster; metrics are not on it."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": plan.name, "labels": labels(plan, "server")},
        "spec": {"type": "ClusterIP", "selector": labels(plan, "server"), "ports": [
            {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
        ]},
    }


def network_policy(plan: Plan) -> dict:
    """HTTP and gRPC from pods of this cluster only; metrics from Prometheus' namespace only."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": plan.name, "labels": labels(plan, "server")},
        "spec": {
            "podSelector": {"matchLabels": labels(plan, "server")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"namespaceSelector": {}}],
                 "ports": [{"protocol": "TCP", "port": HTTP_PORT}, {"protocol": "TCP", "port": GRPC_PORT}]},
                {"from": [{"namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}}],
                 "ports": [{"protocol": "TCP", "port": METRICS_PORT}]},
            ],
        },
    }


def pod_monitor(plan: Plan) -> dict:
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor",
        "metadata": {"name": plan.name, "labels": labels(plan, "server")},
        "spec": {
            "selector": {"matchLabels": labels(plan, "server")},
            "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
            "podTargetLabels": [INSTANCE_LABEL],
        },
    }


def metric_label() -> str:
    """INSTANCE_LABEL as Prometheus names it once the PodMonitor copies it onto the metrics."""
    return "".join(c if c.isalnum() else "_" for c in INSTANCE_LABEL)


def queue_time_query(plan: Plan) -> str:
    """Mean time a request waited in Triton's queue over the last 2 minutes, all models of all pods (seconds;
    0 without requests)."""
    match = f'{{{metric_label()}="{plan.name}"}}'
    return (f"sum(rate(nv_inference_queue_duration_us{match}[2m])) / "
            f"clamp_min(sum(rate(nv_inference_request_success{match}[2m])), 1e-9) / 1e6")


def scaled_object(plan: Plan) -> dict:
    """KEDA scales the Deployment on queue time: replicas x (queue time / target), metric type Value."""
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": plan.name, "labels": labels(plan, "server")},
        "spec": {
            "scaleTargetRef": {"name": plan.name},
            "minReplicaCount": 1,  # never zero: a cold pod takes minutes
            "maxReplicaCount": plan.profile.max_replicas,
            "pollingInterval": 30,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                # New pods help only once loaded: at most double within a startup budget (HPA's longest period).
                "scaleUp": {"stabilizationWindowSeconds": 0, "policies": [
                    {"type": "Percent", "value": 100, "periodSeconds": min(plan.startup_s, HPA_MAX_PERIOD_S)}]},
                "scaleDown": {"stabilizationWindowSeconds": 900,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 600}]},
            }}},
            "triggers": [{"type": "prometheus", "metricType": "Value", "metadata": {
                "serverAddress": PROMETHEUS_URL, "query": queue_time_query(plan),
                "threshold": f"{plan.queue_target_s:.2f}",
            }}],
        },
    }


def disruption_budget(plan: Plan) -> dict:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": plan.name, "labels": labels(plan, "server")},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": labels(plan, "server")}},
    }


def claim(name: str, access: str, size: str, component_labels: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "labels": component_labels},
        "spec": {"accessModes": [access], "resources": {"requests": {"storage": size}}},
    }


def shell_job(name: str, job_labels: dict[str, str], script: str, env: list[dict], mounts: list[dict],
              volumes: list[dict], deadline_s: int) -> dict:
    """A one-shot Job of the image running `script` with sh, never retried (a retry would hide a failure)."""
    worker = container(name, env, mounts, {"requests": {"cpu": 2, "memory": "4Gi"}, "limits": {"memory": "4Gi"}},
                       command=["sh", "-c", script], workingDir=IMAGE_WORKDIR)
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "labels": job_labels},
        "spec": {"backoffLimit": 0, "activeDeadlineSeconds": deadline_s, "template": {
            "metadata": {"labels": job_labels},
            "spec": pod_spec([worker], volumes, restartPolicy="Never"),
        }},
    }


LOCUST_RUN_TIME_S = 600
LOCUST_SCRIPT = f"""set -u
out="{RESULTS_MOUNT}/$JOB_NAME-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
status=0
python3 -m locust --csv "$out/locust" || status=$?
echo "Per-model latencies (client side, seconds): $out/locust_exact.csv"
cat "$out/locust_exact.csv"
exit "$status"
"""


def locust_job(plan: Plan) -> dict:
    """perf/locustfile.py against the Service, one user per model instance of one pod; the per-model table is
    printed to the job's log and kept with Locust's CSVs on the results volume."""
    users = sum(len(model.instances) for model in plan.profile.models)
    name = f"{plan.name}-locust"
    env = {
        "JOB_NAME": name, "LOCUST_LOCUSTFILE": "perf/locustfile.py", "LOCUST_HEADLESS": "true",
        "LOCUST_HOST": f"{plan.name}:{HTTP_PORT}", "LOCUST_MODELS": ",".join(s.name for s in plan.stacks),
        "LOCUST_USERS": str(users), "LOCUST_SPAWN_RATE": str(users), "LOCUST_RUN_TIME": f"{LOCUST_RUN_TIME_S}s",
        "LOCUST_ONLY_SUMMARY": "true",
    }
    return shell_job(name, labels(plan, "load-test"), LOCUST_SCRIPT, [{"name": k, "value": v} for k, v in env.items()],
                     [{"name": "results", "mountPath": RESULTS_MOUNT}],
                     [{"name": "results", "persistentVolumeClaim": {"claimName": RESULTS_CLAIM}}],
                     deadline_s=LOCUST_RUN_TIME_S + 900)


WEIGHTS_LABELS = {"app.kubernetes.io/name": "fluxserve", "app.kubernetes.io/component": "weights"}


def weights_download_job() -> dict:
    """FLUX.1-dev in diffusers format onto the weights volume (gated: an accepted licence's token)."""
    excludes = " ".join(f"--exclude {name}" for name in FLUX_DEV_UNUSED_FILES)
    script = f"hf download {FLUX_DEV_REPO} --local-dir {WEIGHTS_FOLDER} {excludes}\nls -l {WEIGHTS_FOLDER}\n"
    return shell_job(
        "flux1-dev-download", WEIGHTS_LABELS, script,
        [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": HF_TOKEN_SECRET[0], "key": HF_TOKEN_SECRET[1]}}}],
        [{"name": "weights", "mountPath": WEIGHTS_MOUNT}],
        [{"name": "weights", "persistentVolumeClaim": {"claimName": WEIGHTS_CLAIM}}], deadline_s=4 * 3600,
    )


# --- Grafana ----------------------------------------------------------------------------------------------------

MODEL_MATCH = 'namespace=~"$namespace", model=~"$model"'
RATE = "[$__rate_interval]"


def _dcgm(metric: str) -> str:
    """dcgm-exporter labels a GPU with the pod using it; scraped without honorLabels, the labels are renamed
    exported_pod and exported_namespace: either matches."""
    return (f'{metric}{{exported_namespace=~"$namespace", exported_pod=~"fluxserve-.+"}} '
            f'or {metric}{{namespace=~"$namespace", pod=~"fluxserve-.+"}}')


PANELS = (
    ("Latency P50 / P99 per model (server side)", "s", (
        (f'max by (model) (nv_inference_request_summary_us{{{MODEL_MATCH}, quantile="0.5"}}) / 1e6', "{{model}} P50"),
        (f'max by (model) (nv_inference_request_summary_us{{{MODEL_MATCH}, quantile="0.99"}}) / 1e6', "{{model}} P99"),
    )),
    ("Queue time per request", "s", (
        (f"sum by (model) (rate(nv_inference_queue_duration_us{{{MODEL_MATCH}}}{RATE})) / "
         f"sum by (model) (rate(nv_inference_request_success{{{MODEL_MATCH}}}{RATE})) / 1e6", "{{model}}"),
    )),
    ("Requests per second", "reqps", (
        (f"sum by (model) (rate(nv_inference_request_success{{{MODEL_MATCH}}}{RATE}))", "{{model}} served"),
        (f"sum by (model) (rate(nv_inference_request_failure{{{MODEL_MATCH}}}{RATE}))", "{{model}} failed"),
    )),
    ("Denoising steps per second: computed and skipped by the step cache", "short", (
        (f"sum by (model) (rate(fluxserve_steps_computed_total{{{MODEL_MATCH}}}{RATE}))", "{{model}} computed"),
        (f"sum by (model) (rate(fluxserve_steps_skipped_total{{{MODEL_MATCH}}}{RATE}))", "{{model}} skipped"),
    )),
    ("GPU utilisation (DCGM)", "percent", ((_dcgm("DCGM_FI_DEV_GPU_UTIL"), "{{Hostname}} GPU {{gpu}}"),)),
    ("GPU memory used (DCGM)", "mbytes", ((_dcgm("DCGM_FI_DEV_FB_USED"), "{{Hostname}} GPU {{gpu}}"),)),
)


def dashboard() -> dict:
    """The Grafana dashboard: two panels a row, over a Prometheus data source chosen on the dashboard."""
    source = {"type": "prometheus", "uid": "${datasource}"}

    def variable(name: str, query: str) -> dict:
        return {"name": name, "type": "query", "datasource": source, "query": query, "refresh": 2,
                "multi": True, "includeAll": True, "current": {"text": "All", "value": "$__all"}}

    panels = [
        {"id": index + 1, "type": "timeseries", "title": title, "datasource": source,
         "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "targets": [{"refId": chr(ord("A") + i), "datasource": source, "expr": expr, "legendFormat": legend}
                     for i, (expr, legend) in enumerate(targets)]}
        for index, (title, unit, targets) in enumerate(PANELS)
    ]
    return {
        "uid": "fluxserve", "title": "fluxserve: FLUX.1-dev on Triton", "tags": ["fluxserve", "triton"],
        "schemaVersion": 39, "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "type": "datasource", "query": "prometheus"},
            variable("namespace", "label_values(nv_inference_request_success, namespace)"),
            variable("model", 'label_values(nv_inference_request_success{namespace=~"$namespace"}, model)'),
        ]},
        "panels": panels,
    }


DASHBOARD_FILE = "fluxserve-dashboard.json"


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def dashboard_config_map() -> dict:
    """The dashboard for the Grafana of kube-prometheus-stack, whose sidecar loads ConfigMaps with this label."""
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "fluxserve-grafana-dashboard", "labels": {"grafana_dashboard": "1"}},
        "data": {DASHBOARD_FILE: dashboard_json()},
    }


# --- Files ------------------------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Multi-line strings (scripts, the dashboard) as literal blocks; shared values written out, not aliased."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(document: dict) -> str:
    return YAML_HEADER + yaml.dump(document, Dumper=_Dumper, sort_keys=False, width=4096)


def kustomization(files: dict[str, dict]) -> dict[str, str]:
    """Files of one Kustomize directory: each object in its own file, listed by kustomization.yaml."""
    listing = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(files)}
    return {"kustomization.yaml": to_yaml(listing), **{name: to_yaml(obj) for name, obj in files.items()}}


def in_folder(folder: str, files: dict[str, str]) -> dict[str, str]:
    return {f"{folder}/{name}": text for name, text in files.items()}


def render_files() -> dict[str, str]:
    """Every generated file under deploy/, by relative path."""
    files: dict[str, str] = {}
    for profile in PROFILES:
        plan = plan_for(profile)
        files |= in_folder(profile.name, kustomization({
            "deployment.yaml": deployment(plan),
            "service.yaml": service(plan),
            "networkpolicy.yaml": network_policy(plan),
            "podmonitor.yaml": pod_monitor(plan),
            "scaledobject.yaml": scaled_object(plan),
            "poddisruptionbudget.yaml": disruption_budget(plan),
            "compile-cache-pvc.yaml": claim(f"{plan.name}-compile-cache", "ReadWriteMany", "20Gi",
                                            labels(plan, "server")),
        }))
        files |= in_folder(f"{profile.name}/locust", kustomization({
            "job.yaml": locust_job(plan),
            "results-pvc.yaml": claim(RESULTS_CLAIM, "ReadWriteOnce", "1Gi", {"app.kubernetes.io/name": "fluxserve"}),
        }))
    files |= in_folder("weights", kustomization({
        "pvc.yaml": claim(WEIGHTS_CLAIM, "ReadWriteMany", "64Gi", WEIGHTS_LABELS),
        "download-job.yaml": weights_download_job(),
    }))
    files |= in_folder("monitoring", kustomization({"grafana-dashboard.yaml": dashboard_config_map()}))
    files[f"monitoring/{DASHBOARD_FILE}"] = dashboard_json()
    return files


def generated_paths(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")
            if path.is_file() and path.name not in HAND_WRITTEN and "__pycache__" not in path.parts}


def differences(root: Path = DEPLOY) -> list[str]:
    """Files that differ between `root` and what the profiles generate (empty when in sync)."""
    expected = render_files()
    committed = generated_paths(root) if root.is_dir() else set()
    found = [f"{path}: only in the committed deploy/" for path in committed - set(expected)]
    found += [f"{path}: missing from the committed deploy/" for path in set(expected) - committed]
    found += [f"{path}: differs" for path in set(expected) & committed if (root / path).read_text() != expected[path]]
    return sorted(found)


def write(root: Path = DEPLOY) -> None:
    """Write the generated files under `root`, removing generated files that no longer are."""
    expected = render_files()
    for path in generated_paths(root) - set(expected) if root.is_dir() else ():
        (root / path).unlink()
    for path, text in expected.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)


# --- deploy/README.md's tables ----------------------------------------------------------------------------------

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


if __name__ == "__main__":
    sys.exit(main())
