"""``python -m node``: the same as the ``mesh-node`` command."""

import sys

from node.cli import main

sys.exit(main())
