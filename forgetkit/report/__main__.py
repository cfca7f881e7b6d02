"""``python -m forgetkit.report``."""

import sys

from forgetkit.report.index import main

sys.exit(main())
