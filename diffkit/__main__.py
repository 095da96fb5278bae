"""`python -m diffkit`: the same command line as `diffkit`, for environments without the script on PATH."""

import sys

from diffkit.cli import main

sys.exit(main())
