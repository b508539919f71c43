"""``python -m fastgpt train | sample | bench`` (the same as the ``fastgpt`` command)."""

import sys

from fastgpt.cli import main

sys.exit(main())
