"""``inversion.presets``, the import path the README shows: everything of ``inversion.methods.presets``."""

from .methods.presets import *  # noqa: F401,F403
from .methods.presets import __all__  # noqa: F401
