"""``python -m strace_lens``: the ``strace-lens`` command line."""

import sys

from strace_lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
