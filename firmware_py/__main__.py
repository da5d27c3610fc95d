"""`python -m firmware_py` is the same program as `powershare-gw`."""

import sys

from firmware_py.cli import main

sys.exit(main())
