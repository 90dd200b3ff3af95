"""Developer infrastructure shared by ``tests/``, ``tools/`` and ``benchmarks/``; not part of the pack.

- ``harness``: boots a real ComfyUI (``COMFYUI_PATH``) in this process on the CPU, imports the pack
  as ComfyUI imports a custom-node folder, and builds random-weight full-architecture checkpoints
  and tiny SDXL/SD2 model objects with ComfyUI's own classes.
- ``server_process``: a real ComfyUI server in a subprocess with this repository in its
  ``custom_nodes`` (``python -m devtools.server_process OUT.json`` dumps its ``/object_info``).
- ``cdp``: headless Debian chromium driven over the DevTools protocol.
- ``workflow_check``: checks a UI-format workflow against node schemas (``/object_info``).

Imported as ``devtools.<module>`` with the repository root on ``sys.path`` (pytest's ``pythonpath``
in ``pyproject.toml``; the scripts in ``tools/`` and ``benchmarks/`` insert it themselves). ComfyUI
has no top-level ``devtools``, so, unlike a top-level ``tests`` or ``nodes``, the name cannot be
shadowed by its modules once ``harness.boot`` puts the checkout first on ``sys.path``.

Like ``tests/``, ``tools/`` and ``benchmarks/``, this package is left out of the Comfy Registry
archive (``.comfyignore``) and of the library wheel (``[tool.setuptools.packages.find]``).
"""
