"""KEDA's ScaledObject: a profile's replicas follow the time requests wait in Triton's queue, read from
Prometheus."""

from __future__ import annotations

from .manifests import INSTANCE_LABEL, MONITORING_NAMESPACE, labels
from .profiles import Plan

PROMETHEUS_URL = f"http://prometheus-operated.{MONITORING_NAMESPACE}.svc:9090"
HPA_MAX_PERIOD_S = 1800


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
