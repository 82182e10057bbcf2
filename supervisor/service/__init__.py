"""The daemon and its faces: the composition root, the control socket server,
metrics, sd_notify, clearing leftovers and reaping (orphans), dev mode."""
