"""``python -m fastopt``: the ``fastopt`` command (train, compare, valley, bench); see ``fastopt --help``."""
from .app.cli import main

raise SystemExit(main())
