"""``python -m fused_lr.tools.bench ...`` = ``fused-lr bench ...`` (``make gpu-check`` runs it this way)."""

import sys

from fused_lr.tools.bench import main

sys.exit(main())
