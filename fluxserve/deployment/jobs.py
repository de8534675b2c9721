"""The one-shot Jobs: the Locust load test against a profile's Service, and the download of the weights onto
their volume."""

from __future__ import annotations

from .image import HTTP_PORT, IMAGE_WORKDIR
from .manifests import WEIGHTS_CLAIM, WEIGHTS_FOLDER, WEIGHTS_MOUNT, container, labels, pod_spec
from .profiles import Plan

HF_TOKEN_SECRET = ("hf-token", "token")
FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"
# The single-file checkpoints at the repository's top level, which a diffusers-format load does not read (35 GB).
FLUX_DEV_UNUSED_FILES = ("flux1-dev.safetensors", "ae.safetensors")
RESULTS_CLAIM = "fluxserve-locust-results"
RESULTS_MOUNT = "/results"


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
