"""``python -m loraforge.pipeline.cli``: the ``loraforge`` command."""

import sys

from . import main

sys.exit(main())
