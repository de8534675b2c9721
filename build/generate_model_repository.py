"""Regenerate model_repository/ from the stack catalog (fluxserve/stacks.py); `--check` reports drift."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxserve.repository import main  # noqa: E402

sys.exit(main())
