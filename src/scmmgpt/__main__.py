"""``python -m scmmgpt`` runs the command-line interface (the same as the ``scmmgpt`` script)."""

from .cli.main import main

raise SystemExit(main())
