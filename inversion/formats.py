"""``inversion.formats``, the import path the README shows: everything of ``inversion.files.formats``."""

from .files.formats import *  # noqa: F401,F403
from .files.formats import __all__  # noqa: F401
