"""The LoRRA trainer (the loop now lives in :mod:`cbscope.lorra.loop`)."""

from cbscope.lorra import loop as _loop
from cbscope.lorra.loop import *  # noqa: F403

globals().update({k: v for k, v in vars(_loop).items() if not k.startswith("__")})
