"""What Prometheus scrapes (the PodMonitor) and what Grafana shows (the dashboard: a JSON file, and the ConfigMap
that kube-prometheus-stack's Grafana loads)."""

from __future__ import annotations

import json

from .manifests import INSTANCE_LABEL, labels
from .profiles import Plan


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
    ("Prompt cache: prompts served from it and encoded, per second (models with prompt_cache_entries)", "reqps", (
        (f"sum by (model) (rate(fluxserve_prompt_cache_hits_total{{{MODEL_MATCH}}}{RATE}))", "{{model}} hits"),
        (f"sum by (model) (rate(fluxserve_prompt_cache_misses_total{{{MODEL_MATCH}}}{RATE}))", "{{model}} misses"),
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
