"""``inversion.init``, the import path the README shows: everything of ``inversion.methods.init``."""

from .methods.init import *  # noqa: F401,F403
from .methods.init import __all__  # noqa: F401
