"""One program's life: the states table, the Program actor, backoff, spawning
children, capturing their output, reading Go crashes. Imports only config
(and the stdlib-only ``supervisor.fileops``)."""
