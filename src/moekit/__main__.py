"""``python -m moekit``: the same as the ``moekit`` command."""

from .cli import main

raise SystemExit(main())
