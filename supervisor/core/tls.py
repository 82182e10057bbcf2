"""OpenSSL only for a configuration that speaks TLS.

asyncio's ``base_events``, ``selector_events`` and ``sslproto`` each begin
with ``try: import ssl``, so every asyncio program carries the ``ssl``
module, ``_ssl`` and libssl, whether it ever opens a TLS connection or not:
about 4.4 MiB of an idle gosup's RSS on this project's machines (`python -c
"import asyncio"` 19.9 MiB, the same with ssl held back 15.5 MiB). gosup
needs TLS only for an ``https://`` probe, Go metrics scrape or pprof dump
(``health/gohttp.py``), which most configurations never name.

So the daemon's entry point imports asyncio with ``ssl`` held back
(`import_asyncio_without_ssl`): those modules then bind ``ssl = None``, as
they would on a Python built without OpenSSL. The first https connection
asks `load()`, which imports ``ssl`` and hands it to those modules, the names
they bound at import included (``sslproto.SSLAgainErrors``), so asyncio can
use it from then on exactly as if it had been there from the start. Only
those three modules test ``ssl``; the rest of asyncio (streams, transports)
reaches TLS through them.

gosup's own hashing loads no OpenSSL either (``fileops``: CPython's builtin
SHA-256, or a short-lived child for a large binary), so a plain daemon maps
neither libssl nor libcrypto.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_ASYNCIO_SSL_USERS = ("asyncio.base_events", "asyncio.selector_events", "asyncio.sslproto")
_lock = threading.Lock()  # load() may run in a worker thread (gohttp builds contexts there)


def import_asyncio_without_ssl() -> None:
    """Import asyncio with ``ssl`` held back; call before anything imports
    asyncio (loguru does). Does nothing when asyncio or ssl is loaded already
    (too late to save anything) and never breaks a later ``import ssl``: the
    hold lasts only as long as asyncio's own import."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401  (its ssl users are imported by its __init__)
    finally:
        if sys.modules.get("ssl", False) is None:
            del sys.modules["ssl"]


def load() -> ModuleType:
    """The ``ssl`` module, imported now if it is not yet, and given to the
    asyncio modules that found none when they were imported. Idempotent and
    cheap after the first call; the first reads ssl and libssl from disk, so
    call it from a thread (or before the loop runs)."""
    with _lock:
        import ssl

        for name in _ASYNCIO_SSL_USERS:
            module = sys.modules.get(name)
            if module is not None and getattr(module, "ssl", None) is None:
                module.ssl = ssl  # type: ignore[attr-defined]
        sslproto = sys.modules.get("asyncio.sslproto")
        if sslproto is not None and not hasattr(sslproto, "SSLAgainErrors"):
            sslproto.SSLAgainErrors = (ssl.SSLWantReadError, ssl.SSLSyscallError)  # type: ignore[attr-defined]
        return ssl


def loaded() -> bool:
    """Whether ``ssl`` is in this process (for tests and the status of a daemon)."""
    return isinstance(sys.modules.get("ssl"), ModuleType)
