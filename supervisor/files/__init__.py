"""Staged files: watching (the watchdog bridge), verify/validate/swap, and
ConfigSync (probation, rollback). Sends typed commands to the Program."""
