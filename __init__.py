"""ComfyUI-Inversion: textual inversion (learned token embeddings) as ComfyUI nodes.

ComfyUI imports this folder as a package (``custom_nodes/<folder>/__init__.py``) and calls
``comfy_entrypoint`` (the V3 node API). Without ComfyUI (e.g. when pytest collects the repository)
nothing is defined except ``WEB_DIRECTORY``; the library lives in ``inversion/`` and never imports
ComfyUI.
"""

WEB_DIRECTORY = "./web"

try:
    from comfy_api.latest import ComfyExtension
except ImportError:  # not running inside ComfyUI
    ComfyExtension = None

if ComfyExtension is not None:
    from .nodes import NODES

    class InversionExtension(ComfyExtension):
        async def get_node_list(self) -> list:
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return InversionExtension()

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
