"""``python -m hookah.cli``: the ``hookah`` command without the console script."""
import sys

from hookah.cli.main import main

sys.exit(main())
