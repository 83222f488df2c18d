"""loraflow's built-in trainer plugins, each registered through the `loraflow` entry-point group."""

import logging

# bitsandbytes logs a warning on import when the optional `kernels` package is missing; its CPU path works without it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
