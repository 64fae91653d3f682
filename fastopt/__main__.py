"""``python -m fastopt``: the ``fastopt`` command (train, compare, valley, bench); see ``fastopt --help``."""
from .cli import main

raise SystemExit(main())
