"""The server's manifests (Deployment, Service, NetworkPolicy, PodDisruptionBudget) and what every generated pod
and object shares: labels, security contexts, containers, volume claims."""

from __future__ import annotations

from ..contract import ADMIN_KEY_ENV
from ..server.placement import format_instance
from ..shared_dirs import COMPILE_CACHE_ENV
from ..weights import ENV_VAR as WEIGHTS_ENV
from .image import GRPC_PORT, HTTP_PORT, IMAGE, LAUNCHER, METRICS_PORT, TRITON_FLAGS
from .profiles import PRE_STOP_S, PROBE_PERIOD_S, Model, Plan

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"  # set on each GPU node by NVIDIA's GPU feature discovery
GPU_RESOURCE = "nvidia.com/gpu"
ADMIN_SECRET = ("fluxserve-admin-key", "admin-key")  # Secret name and key, created by hand (deploy/README.md)
WEIGHTS_CLAIM = "flux1-dev-weights"
WEIGHTS_MOUNT = "/weights"
WEIGHTS_FOLDER = f"{WEIGHTS_MOUNT}/FLUX.1-dev"
COMPILE_CACHE_MOUNT = "/var/cache/fluxserve"
MONITORING_NAMESPACE = "monitoring"  # where Prometheus runs (kube-prometheus-stack's usual namespace)
INSTANCE_LABEL = "app.kubernetes.io/instance"  # copied onto the metrics by the PodMonitor, for the autoscaler
UID = 1000  # any non-root id: the image's files are world-readable, writes go to volumes
IMAGE_PULL_S = 900  # the image is tens of GB (NGC Triton + torch): first pull on a node
CPUS_PER_GPU = 8  # torch.compile's Inductor compiles in parallel processes at load


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
