"""The frozen binary's entry point: the same ``main`` as ``python -m tunnel``."""

import sys

from tunnel.__main__ import main

sys.exit(main())
