"""Generate `deploy/`: Kubernetes manifests for fluxserve, one profile per GPU type, from the stack catalog.

Like `model_repository/` (fluxserve/repository.py), the manifests are generated and committed, and a test fails
when they drift from what this package writes. A profile (`PROFILES`) says which GPU nodes it runs on, which
stacks a pod serves and on which of its GPUs; everything else is derived: the GPUs and memory a pod requests, its
startup probe (from the cold loads measured in perf/results/h200: results.csv and the served cold starts with the
load's warm-up, */cold-start*/loads.json), the autoscaler's queue-time target
(from the measured latency), the ports (the launcher's defaults) and the Locust job's models.

Each profile folder is a Kustomize directory (`kubectl apply -k deploy/<profile>`) whose kustomization.yaml only
lists complete manifests, without patches: what the tests validate offline is exactly what gets applied, and a
site's own overlay (image, namespace, storage classes) goes on top (deploy/README.md).

Modules, each importing only those above it:
  image          the image, its launcher and the launcher's ports
  measurements   the H200's served rows and cold starts that every number is derived from
  profiles       the GPU profiles and the plan each one's pods follow (`plan_for`)
  manifests      the server's Deployment, Service, NetworkPolicy, PodDisruptionBudget; labels, containers, claims
  autoscaling    KEDA's ScaledObject on queue time
  jobs           the Locust load test and the weights download
  monitoring     the PodMonitor and the Grafana dashboard
  files          every file under deploy/: writing them, the drift check
  readme_tables  deploy/README.md's tables
  cli            the command line (`python -m fluxserve.deployment`)
"""

from .cli import main
from .files import differences
from .image import IMAGE_WORKDIR, LAUNCHER, METRICS_PORT
from .manifests import MONITORING_NAMESPACE
from .monitoring import DASHBOARD_FILE
from .profiles import FASTEST, PROFILES, GpuProfile, Model, ProfileError, on_every_gpu, plan_for
from .readme_tables import expected_latency_table, profile_table

__all__ = [
    "DASHBOARD_FILE", "FASTEST", "IMAGE_WORKDIR", "LAUNCHER", "METRICS_PORT", "MONITORING_NAMESPACE", "PROFILES",
    "GpuProfile", "Model", "ProfileError", "differences", "expected_latency_table", "main", "on_every_gpu",
    "plan_for", "profile_table",
]
