"""The daemon and its faces: the composition root, the control socket server,
metrics, sd_notify, the leftover sweep, dev mode."""
