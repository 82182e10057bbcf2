"""``python -m supervisor``: the ``gosup`` command."""

import sys

from supervisor.gosup import main

sys.exit(main())
