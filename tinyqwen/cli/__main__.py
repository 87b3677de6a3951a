"""`python -m tinyqwen.cli ...`: the `tinyqwen` command without the installed script (tests and a fresh clone)."""

import sys

from tinyqwen.cli import main

if __name__ == "__main__":  # not when imported (the docstring tests import every module)
    sys.exit(main())
