"""The command line: argparse front end, socket client, ``stage``, history display.

Light on purpose: ``gosup status`` imports only this package, ``protocol``
and the stdlib (never asyncio, psutil or the daemon). The daemon behind
``run`` is handed in by ``supervisor/gosup.py``, the program's entry point.
"""
