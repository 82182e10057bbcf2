"""Watching a running program: resource sampling, Go runtime metrics, evidence.
Decides and sends typed commands to the Program; never signals a child itself."""
