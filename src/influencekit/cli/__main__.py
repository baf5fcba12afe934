"""``python -m influencekit.cli``: the same as the ``influencekit`` command."""

import sys

from influencekit.cli import main

sys.exit(main())
