"""``python -m supervisor.cli``: the ``gosup`` command."""

import sys

from supervisor.cli.commands import main

sys.exit(main())
