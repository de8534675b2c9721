"""deploy/: the Kubernetes manifests generated per GPU profile, checked offline (no cluster is reachable here).

Every Kustomize directory is rendered the way `kubectl apply -k` would (its kustomization.yaml only lists files)
and each core object is validated against Kubernetes' OpenAPI schemas by kubernetes-validate, strictly (an unknown
field fails). The custom resources (PodMonitor, KEDA's ScaledObject) are not in those schemas: they are checked
here field by field, and the ScaledObject's HPA behaviour against autoscaling/v2's schema. The invariants are
checked against the code they depend on: the launcher, run on the pod's own arguments; the catalog; the measured
loads; build/Dockerfile, linted by hadolint.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as validate_utils

from conftest import ROOT
from fluxserve import deployment, serve
from fluxserve.contract import ADMIN_KEY_ENV
from fluxserve.server.placement import GPU_GROUPS_PARAMETER, parse_groups
from fluxserve.repository import PARAMETER_LINE
from fluxserve.stacks import Stack, catalog_by_name
from fluxserve.weights import ENV_VAR as WEIGHTS_ENV

DEPLOY = ROOT / "deploy"
KUSTOMIZE_DIRS = sorted(path.parent for path in DEPLOY.rglob("kustomization.yaml"))
PROFILE_DIRS = [DEPLOY / profile.name for profile in deployment.PROFILES]
# The schemas of the newest Kubernetes release the validator ships, and of its oldest.
KUBERNETES_VERSIONS = (validate_utils.latest_version(), validate_utils.all_versions()[0])
CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "PodMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
# Compute capability of the GPUs that GPU feature discovery names (NVIDIA's data sheets).
PRODUCT_CAPABILITY = {"NVIDIA-A100-SXM4-80GB": (8, 0), "NVIDIA-H100-80GB-HBM3": (9, 0), "NVIDIA-H200": (9, 0)}


def render(folder: Path) -> list[dict]:
    """The objects `kubectl apply -k folder` applies: the files kustomization.yaml lists, nothing transformed."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert set(kustomization) == {"apiVersion", "kind", "resources"}, "patches or transformers: not rendered here"
    assert kustomization["kind"] == "Kustomization"
    files = {path.name for path in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files, f"{folder}: files not applied, or listed but missing"
    return [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((folder / name).read_text())]


def objects(folder: Path, kind: str) -> list[dict]:
    return [obj for obj in render(folder) if obj["kind"] == kind]


def only(folder: Path, kind: str) -> dict:
    (obj,) = objects(folder, kind)
    return obj


def server(folder: Path) -> dict:
    (container,) = only(folder, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def container_port(container: dict, name: str) -> int:
    return next(port["containerPort"] for port in container["ports"] if port["name"] == name)


class Launched(Exception):
    """Raised in place of the launcher's exec: carries the tritonserver command line and its environment."""


def launch(container: dict, monkeypatch, placed: Path) -> tuple[list[str], dict[str, str]]:
    """Run the launcher's main on the container's arguments and environment (Secrets as a stand-in value), up to
    the exec of tritonserver; the repository copy its --gpus places models in goes under `placed`."""
    args = container["args"]
    assert args[:len(deployment.LAUNCHER)] == list(deployment.LAUNCHER)
    for variable in container["env"]:
        monkeypatch.setenv(variable["name"], variable.get("value", "from-a-secret"))
    monkeypatch.setattr(serve, "PLACED_REPOSITORIES", placed)
    monkeypatch.setattr(serve, "find_triton", lambda: serve.TritonInstall(serve.SYSTEM_TRITON))
    monkeypatch.setattr(serve, "resolve_weights", lambda spec: spec)  # the volume is not here

    def execvpe(file, command, env):
        raise Launched(command, env)

    monkeypatch.setattr(serve.os, "execvpe", execvpe)
    with pytest.raises(Launched) as launched:
        serve.main(args[len(deployment.LAUNCHER):])
    return launched.value.args


def flag_values(command: list[str], flag: str) -> list[str]:
    return [part.split("=", 1)[1] for part in command if part.startswith(f"{flag}=")]


def flag_value(command: list[str], flag: str) -> str:
    (value,) = flag_values(command, flag)
    return value


def served_models(container: dict) -> list[str]:
    args = container["args"]
    return args[args.index("--models") + 1].split(",")


def slowest_measured_load(stack: Stack) -> float:
    """The longest cold load of `stack` in perf/results/h200/results.csv and in the served cold starts with the
    load's warm-up (*/cold-start*/loads.json); a context-parallel stack, not yet measured, by its one-GPU twin,
    which each of its workers loads."""
    results = ROOT / "perf" / "results" / "h200"
    with (results / "results.csv").open(newline="") as file:
        loads = [(row["name"], float(row["load_s"])) for row in csv.DictReader(file) if row["mode"] == "server"]
    for path in results.glob("*/cold-start*/loads.json"):
        loads += [(model, load["load_seconds"]) for model, load in json.loads(path.read_text()).items()]
    return max(seconds for name, seconds in loads if name == re.sub(r"-(cp|ring)\d+$", "", stack.name))


def instances(container: dict) -> dict[str, int]:
    """Model -> how many instances the pod's launcher places (`--gpus MODEL=GPUS,GPUS...`)."""
    args = container["args"]
    placed = [args[i + 1].split("=", 1) for i, part in enumerate(args) if part == "--gpus"]
    return {model: len(gpus.split(",")) for model, gpus in placed}


def test_committed_deploy_matches_the_profiles():
    assert deployment.differences(DEPLOY) == []


@pytest.mark.parametrize("folder", KUSTOMIZE_DIRS, ids=lambda path: str(path.relative_to(DEPLOY)))
def test_every_kustomization_renders_and_validates_offline(folder):
    rendered = render(folder)
    assert rendered
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_RESOURCES:
            continue  # checked by the tests below
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_pod_monitor_scrapes_the_metrics_port_of_the_server_pods(folder):
    monitor = only(folder, "PodMonitor")
    pod_labels = only(folder, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["name"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert container_port(server(folder), endpoint["port"]) == deployment.METRICS_PORT
    assert endpoint["path"] == "/metrics"
    assert set(monitor["spec"]["podTargetLabels"]) <= set(pod_labels)


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_scaled_object_scales_the_deployment_on_queue_time(folder):
    scaled = only(folder, "ScaledObject")
    spec = scaled["spec"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["metadata"]["name"]
    assert spec["scaleTargetRef"]["name"] == only(folder, "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    metadata = trigger["metadata"]
    assert all(isinstance(metadata[key], str) for key in ("serverAddress", "query", "threshold"))
    assert float(metadata["threshold"]) > 0
    for metric in ("nv_inference_queue_duration_us", "nv_inference_request_success"):
        assert metric in metadata["query"]
    # The queries select the pods by the label the PodMonitor copies onto their metrics.
    label = only(folder, "PodMonitor")["spec"]["podTargetLabels"][0]
    pod_labels = only(folder, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert f'{re.sub(r"[^A-Za-z0-9]", "_", label)}="{pod_labels[label]}"' in metadata["query"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    periods = [policy["periodSeconds"] for rule in behavior.values() for policy in rule["policies"]]
    assert all(0 < period <= 1800 for period in periods)  # the API server's bound, not in the schema
    hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "behaviour"},
           "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                    "maxReplicas": 2, "behavior": behavior}}
    kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[0], strict=True)


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_the_launcher_binds_the_ports_the_manifests_expose(folder, monkeypatch, tmp_path):
    container = server(folder)
    command, env = launch(container, monkeypatch, tmp_path)
    ports = {name: int(flag_value(command, f"--{name}-port")) for name in ("http", "grpc", "metrics")}
    assert ports == {name: container_port(container, name) for name in ports}
    assert flag_value(command, "--http-address") == "0.0.0.0"
    service = only(folder, "Service")
    assert {port["name"]: port["port"] for port in service["spec"]["ports"]} == {
        "http": ports["http"], "grpc": ports["grpc"]}
    assert flag_values(command, "--load-model") == served_models(container)
    assert "--metrics-config=summary_latencies=true" in command  # the dashboard's P50 / P99
    # The key reached Triton's restricted APIs; weights and compile cache are the volumes'.
    assert any(part.startswith("--http-restricted-api=") for part in command)
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert env[WEIGHTS_ENV].startswith(mounts["weights"]["mountPath"] + "/") and mounts["weights"]["readOnly"]
    assert env[serve.COMPILE_CACHE_ENV].startswith(mounts["compile-cache"]["mountPath"] + "/")


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_the_launcher_refuses_the_pod_without_its_admin_key(folder, monkeypatch, tmp_path):
    container = server(folder)
    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    with pytest.raises(SystemExit, match=ADMIN_KEY_ENV):
        launch({**container, "env": [v for v in container["env"] if v["name"] != ADMIN_KEY_ENV]}, monkeypatch,
               tmp_path)


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_shutdown_outlasts_the_exit_timeout(folder, monkeypatch, tmp_path):
    command, _ = launch(server(folder), monkeypatch, tmp_path)
    exit_timeout = int(flag_value(command, "--exit-timeout-secs"))
    pod = only(folder, "Deployment")["spec"]["template"]["spec"]
    pre_stop = int(server(folder)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + exit_timeout


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_startup_probe_outlasts_the_measured_cold_loads_one_after_the_other(folder):
    catalog = catalog_by_name()
    probe = server(folder)["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    assert probe["httpGet"]["path"] == "/v2/health/ready"
    assert "--model-load-thread-count=1" in server(folder)["args"]  # Triton loads one instance after another
    placed = instances(server(folder))
    assert set(placed) == set(served_models(server(folder)))
    assert budget >= sum(count * slowest_measured_load(catalog[model]) for model, count in placed.items())
    assert only(folder, "Deployment")["spec"]["progressDeadlineSeconds"] > budget


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_probes_use_tritons_health_endpoints(folder):
    container = server(folder)
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_every_served_stack_runs_on_the_nodes_gpus(folder):
    catalog = catalog_by_name()
    affinity = only(folder, "Deployment")["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    (expression,) = term["matchExpressions"]
    assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In"
    capability = min(PRODUCT_CAPABILITY[product] for product in expression["values"])
    beyond = [name for name in served_models(server(folder))
              if catalog[name].capability_need and capability < catalog[name].capability_need.capability]
    assert not beyond, f"stacks beyond compute capability {capability}: {beyond}"


def profile_on(capability: tuple[int, int], stack: str) -> deployment.GpuProfile:
    """The A100 profile, given another compute capability and `stack` on each of its GPUs."""
    a100 = next(profile for profile in deployment.PROFILES if profile.name == "a100-80gb")
    return dataclasses.replace(a100, compute_capability=capability, models=(deployment.on_every_gpu(stack, 2),))


FP8_ATTENTION_STACK = "bf16-fp8attn"
FP8_LINEAR_STACK = deployment.FASTEST


def test_the_concrete_stacks_are_fp8_in_attention_only_and_in_linear_layers_only():
    catalog = catalog_by_name()
    assert (catalog[FP8_ATTENTION_STACK].attention, catalog[FP8_ATTENTION_STACK].quantization) == ("fp8attn", "none")
    assert (catalog[FP8_LINEAR_STACK].attention, catalog[FP8_LINEAR_STACK].quantization) == ("cudnn", "fp8row")


@pytest.mark.parametrize("capability", [(8, 0), (8, 9)], ids=["a100", "ada"])
def test_the_generator_refuses_fp8_attention_below_hopper(capability):
    with pytest.raises(deployment.ProfileError, match=rf"{FP8_ATTENTION_STACK}: .*compute capability 9\.0\+"):
        deployment.plan_for(profile_on(capability, FP8_ATTENTION_STACK))


def test_the_generator_accepts_fp8_linear_layers_on_ada_but_not_on_the_a100():
    assert deployment.plan_for(profile_on((8, 9), FP8_LINEAR_STACK)).stacks == (catalog_by_name()[FP8_LINEAR_STACK],)
    with pytest.raises(deployment.ProfileError, match=rf"{FP8_LINEAR_STACK}: .*compute capability 8\.9\+"):
        deployment.plan_for(profile_on((8, 0), FP8_LINEAR_STACK))


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_gpus_requested_are_the_gpus_the_launcher_places_the_models_on(folder, monkeypatch, tmp_path):
    container = server(folder)
    command, _ = launch(container, monkeypatch, tmp_path)
    repository = Path(flag_value(command, "--model-repository"))
    assert repository.parent == tmp_path, "every model is placed with --gpus"
    used = set()
    for model in served_models(container):
        parameters = dict(PARAMETER_LINE.findall((repository / model / "config.pbtxt").read_text()))
        used |= {gpu for gpus in parse_groups(parameters[GPU_GROUPS_PARAMETER]) for gpu in gpus}
    requested = container["resources"]["limits"]["nvidia.com/gpu"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == requested
    assert used == set(range(requested))


def test_every_named_stack_is_in_the_catalog():
    catalog = catalog_by_name()
    for folder in PROFILE_DIRS:
        (job,) = objects(folder / "locust", "Job")
        (locust,) = job["spec"]["template"]["spec"]["containers"]
        env = {v["name"]: v.get("value") for v in locust["env"]}
        for name in [*served_models(server(folder)), *env["LOCUST_MODELS"].split(",")]:
            assert name in catalog


def all_rendered() -> list[dict]:
    return [obj for folder in KUSTOMIZE_DIRS for obj in render(folder)]


def containers_of(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", [])


def test_the_admin_key_only_comes_from_a_secret():
    rendered = all_rendered()
    assert not [obj for obj in rendered if obj["kind"] == "Secret"], "no secret value is committed"
    found = 0
    for obj in rendered:
        for container in containers_of(obj):
            for variable in container.get("env", []):
                if variable["name"] == ADMIN_KEY_ENV:
                    assert set(variable) == {"name", "valueFrom"} and set(variable["valueFrom"]) == {"secretKeyRef"}
                    found += 1
            assert not any("admin" in arg.lower() for arg in container.get("args", []))
    assert found == len(PROFILE_DIRS)


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_metrics_stay_off_the_service_and_inside_the_monitoring_namespace(folder):
    metrics = container_port(server(folder), "metrics")
    service = only(folder, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert metrics not in {port["port"] for port in service["spec"]["ports"]}
    assert "metrics" not in {port["targetPort"] for port in service["spec"]["ports"]}
    policy = only(folder, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        ports = {port["port"] for port in rule["ports"]}
        assert all(set(source) == {"namespaceSelector"} for source in rule["from"]), "in-cluster sources only"
        if metrics in ports:
            assert ports == {metrics}
            assert [source["namespaceSelector"] for source in rule["from"]] == [
                {"matchLabels": {"kubernetes.io/metadata.name": deployment.MONITORING_NAMESPACE}}]


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_updates_and_disruptions_keep_a_pod_serving(folder):
    spec = only(folder, "Deployment")["spec"]
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    budget = only(folder, "PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] >= 1 and budget["selector"] == spec["selector"]


def test_pods_run_as_non_root_with_memory_limits():
    for obj in all_rendered():
        if "template" not in obj.get("spec", {}):
            continue
        pod = obj["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            resources = container["resources"]
            assert resources["requests"]["memory"] == resources["limits"]["memory"]


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_shared_memory_is_a_memory_volume_within_the_memory_limit(folder):
    pod = only(folder, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    shm = next(volume for volume in pod["volumes"] if volume["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    gib = lambda quantity: int(quantity.removesuffix("Gi"))  # noqa: E731
    assert gib(shm["emptyDir"]["sizeLimit"]) < gib(container["resources"]["limits"]["memory"])


@pytest.mark.parametrize("folder", PROFILE_DIRS, ids=lambda path: path.name)
def test_locust_job_calls_the_service_and_keeps_its_table(folder):
    (job,) = objects(folder / "locust", "Job")
    (claim,) = objects(folder / "locust", "PersistentVolumeClaim")
    pod = job["spec"]["template"]["spec"]
    (locust,) = pod["containers"]
    env = {v["name"]: v.get("value") for v in locust["env"]}
    service = only(folder, "Service")
    http = next(port["port"] for port in service["spec"]["ports"] if port["name"] == "http")
    assert env["LOCUST_HOST"] == f"{service['metadata']['name']}:{http}"
    assert env["LOCUST_MODELS"].split(",") == served_models(server(folder))
    assert (ROOT / env["LOCUST_LOCUSTFILE"]).is_file() and locust["workingDir"] == dockerfile_instruction("WORKDIR")
    (results,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
    assert results["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = next(m["mountPath"] for m in locust["volumeMounts"] if m["name"] == results["name"])
    script = locust["command"][-1]
    assert f'out="{mount}/' in script and '--csv "$out/locust"' in script and 'cat "$out/locust_exact.csv"' in script
    assert job["spec"]["backoffLimit"] == 0


def test_dashboard_shows_latency_queue_throughput_steps_prompt_cache_and_gpus():
    text = (DEPLOY / "monitoring" / deployment.DASHBOARD_FILE).read_text()
    config_map = only(DEPLOY / "monitoring", "ConfigMap")
    assert config_map["data"][deployment.DASHBOARD_FILE] == text
    board = json.loads(text)
    expressions = " ".join(target["expr"] for panel in board["panels"] for target in panel["targets"])
    counters = re.findall(r'"(fluxserve_\w+_total)"', (ROOT / "fluxserve" / "triton_model.py").read_text())
    assert sorted(counters) == ["fluxserve_prompt_cache_hits_total", "fluxserve_prompt_cache_misses_total",
                                "fluxserve_steps_computed_total", "fluxserve_steps_skipped_total"]
    for metric in [*counters, 'nv_inference_request_summary_us', 'quantile="0.5"', 'quantile="0.99"',
                   "nv_inference_queue_duration_us", "nv_inference_request_success", "DCGM_FI_DEV_GPU_UTIL",
                   "DCGM_FI_DEV_FB_USED"]:
        assert metric in expressions
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = [(panel["gridPos"]["x"], panel["gridPos"]["y"]) for panel in board["panels"]]
    assert len(cells) == len(set(cells))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert set(re.findall(r"\$(\w+)", expressions)) - {"__rate_interval"} <= variables


def dockerfile_instruction(name: str) -> str:
    """The last `name` instruction's argument in build/Dockerfile (instructions here fit on one line)."""
    lines = [line for line in (ROOT / "build" / "Dockerfile").read_text().splitlines() if line.startswith(name + " ")]
    return lines[-1].split(" ", 1)[1]


def test_dockerfile_lints_clean_with_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    found = subprocess.run([hadolint, "--no-color", "--format", "json", str(ROOT / "build" / "Dockerfile")],
                           capture_output=True, text=True, timeout=60)
    assert json.loads(found.stdout) == [], found.stdout
    assert found.returncode == 0


def test_image_and_pods_run_the_readme_launcher():
    command = json.loads(dockerfile_instruction("CMD"))
    assert command[:len(deployment.LAUNCHER)] == list(deployment.LAUNCHER)
    serve_sh = (ROOT / "build" / "serve.sh").read_text()
    assert re.search(r'^exec "\$root/\.venv/bin/python" -m fluxserve\.serve "\$@"$', serve_sh, re.M)
    assert deployment.LAUNCHER[1:] == ("-m", "fluxserve.serve")
    for folder in PROFILE_DIRS:
        assert server(folder)["args"][:len(deployment.LAUNCHER)] == list(deployment.LAUNCHER)
    assert dockerfile_instruction("WORKDIR") == deployment.IMAGE_WORKDIR


@pytest.mark.parametrize("models,message", [
    ((deployment.Model("bf16-x", ((0,),)),), "not in the catalog"),
    (tuple(deployment.on_every_gpu(name, 2) for name in ("bf16", "fp16", "bf16-compile-regional")), "GPU 0 needs"),
    ((deployment.Model("bf16", ((1,),)),), "0..N-1"),
    ((deployment.Model("bf16-cp2", ((0,),)),), "takes 2 GPU"),
])
def test_profiles_that_cannot_be_served_are_refused(models, message):
    a100 = next(profile for profile in deployment.PROFILES if profile.name == "a100-80gb")
    with pytest.raises(ValueError, match=message):
        deployment.plan_for(dataclasses.replace(a100, models=models))


def test_readmes_show_the_generated_tables():
    readme = (DEPLOY / "README.md").read_text()
    assert deployment.profile_table() in readme
    assert deployment.expected_latency_table() in readme
    assert "deploy/README.md" in (ROOT / "README.md").read_text()
