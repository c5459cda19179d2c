"""``python -m minitransformer …``: the same as the ``minitransformer`` command (see cli.py)."""
import sys

from .cli import main

sys.exit(main())
