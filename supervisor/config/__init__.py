"""app.toml -> frozen dataclasses (stdlib only).

Every error names the file and the key path
(``app.toml: programs.api.backoff.max: must be > 0``); unknown keys are
errors. This is the package's public face; the parts live in its modules.
"""

from supervisor.config.appconfig import *  # noqa: F403
from supervisor.config.appconfig import __all__ as __all__
