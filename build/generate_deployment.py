"""Regenerate deploy/ (Kubernetes manifests per GPU profile) from fluxserve/deployment/; `--check` reports drift."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxserve.deployment import main  # noqa: E402

sys.exit(main())
