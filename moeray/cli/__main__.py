"""``python -m moeray.cli``: the same as the ``moeray`` command."""

import sys

from moeray.cli import main

sys.exit(main())
