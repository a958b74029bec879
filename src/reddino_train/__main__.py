"""``python -m reddino_train`` (and ``torchrun -m reddino_train``): the ``reddino-train`` CLI."""

import sys

from .cli import main

sys.exit(main())
