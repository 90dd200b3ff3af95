"""inversion: textual inversion for frozen text-to-image diffusion models, with the
fastest-converging published methods. Standalone: no UI imports."""

__version__ = "0.1.0"
