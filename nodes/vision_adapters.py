"""The ComfyUI -> library adapters of the vision-language nodes.

- ``comfy_vision_tower``: a CLIP_VISION model as an ``inversion.ovi.VisionTower`` (a transformers copy
  that autograd can run through);
- ``ComfyClipTextTower``: an SD2.x / SDXL CLIP as an ``inversion.ovi.TextTower`` (its projected pooled output);
- ``images_bchw``: a ComfyUI IMAGE as the library's image batch.
"""

from __future__ import annotations

import torch

import comfy.clip_model
import comfy.sd1_clip

from ..inversion import ovi

__all__ = ["images_bchw", "comfy_vision_tower", "ComfyClipTextTower"]


def images_bchw(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> the library's [B, 3, H, W] (float32, CPU)."""
    return image[..., :3].movedim(-1, 1).float().cpu()


def comfy_vision_tower(clip_vision, device: torch.device, dtype: torch.dtype) -> ovi.HFVisionTower:
    """A ComfyUI CLIP_VISION model as an ``inversion.ovi.VisionTower``.

    The weights are copied into a transformers ``CLIPVisionModelWithProjection`` (ComfyUI uses the
    same key names): a copy made outside inference mode is usable by autograd, and transformers'
    layers add residuals out of place, which ComfyUI's ``CLIPLayer`` does not (notes section 3).
    Call under ``torch.inference_mode(False)``.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = getattr(clip_vision, "model", None)
    vm = getattr(model, "vision_model", None)
    proj = getattr(model, "visual_projection", None)
    if not isinstance(model, comfy.clip_model.CLIPVisionModelProjection) or vm.embeddings.class_embedding is None \
            or not isinstance(proj, torch.nn.Linear):
        raise TypeError(
            "clip_vision: OVI needs a CLIP vision model with a projection into the text space (e.g. "
            "clip_vision_h.safetensors for SD2.1 unCLIP-H, ViT-L for unCLIP-L, ViT-bigG); SigLIP, DINOv2 and "
            f"projection-less encoders cannot be used (got {type(model).__name__})"
        )
    layer = vm.encoder.layers[0]
    acts = {id(fn): name for name, fn in comfy.clip_model.ACTIVATIONS.items()}
    act = acts.get(id(layer.mlp.activation))
    if act is None:
        raise TypeError("clip_vision: unknown MLP activation in this CLIP vision model; update nodes/vision_adapters.py")
    conv = vm.embeddings.patch_embedding
    cfg = CLIPVisionConfig(
        hidden_size=int(vm.embeddings.class_embedding.shape[0]), intermediate_size=int(layer.mlp.fc1.weight.shape[0]),
        num_hidden_layers=len(vm.encoder.layers), num_attention_heads=int(layer.self_attn.heads),
        num_channels=int(conv.weight.shape[1]), image_size=int(clip_vision.image_size),
        patch_size=int(conv.weight.shape[-1]), projection_dim=int(proj.weight.shape[0]), hidden_act=act,
        layer_norm_eps=float(vm.pre_layrnorm.eps),
    )
    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(cfg)
    sd = {k: v.detach().to(device, dtype).clone() for k, v in model.state_dict().items()
          if not k.startswith("multi_modal_projector.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise TypeError(f"clip_vision: weights do not match a CLIP vision transformer (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    emb = hf.vision_model.embeddings
    emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))
    return ovi.HFVisionTower(hf.eval(), int(clip_vision.image_size), clip_vision.image_mean, clip_vision.image_std)


class ComfyClipTextTower:
    """An SD2.x CLIP (clip_h) or SDXL CLIP (clip_g) as an ``inversion.ovi.TextTower``: the projected
    pooled output, which lies in OpenCLIP-H's / bigG's joint image-text space."""

    def __init__(self, clip):
        csm = getattr(clip, "cond_stage_model", None)
        keys = [k for k in ("clip_h", "clip_g", "clip_l")
                if isinstance(getattr(csm, k, None), comfy.sd1_clip.SDClipModel)]
        if not keys:
            raise TypeError(f"clip: OVI needs an SD2.x or SDXL CLIP, got {type(csm).__name__}")
        if keys[0] == "clip_l":
            raise ValueError(
                "clip: this is an SD1 CLIP (clip_l only). SD1 checkpoints carry no text projection and "
                "ComfyUI leaves it uninitialised, so its pooled output is not in any image-embedding space. "
                "Connect an SD2.x CLIP (clip_h, the space of clip_vision_h / SD2.1 unCLIP-H), an SDXL CLIP "
                "(clip_g, the space of ViT-bigG), or choose an open_clip text encoder file instead"
            )
        self.key = keys[0]
        self.clip = clip
        proj = getattr(getattr(csm, self.key).transformer, "text_projection", None)
        self.embed_dim = int(proj.weight.shape[0]) if isinstance(proj, torch.nn.Linear) else -1

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        rows = []
        for text in texts:
            _, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            rows.append(pooled.float().reshape(1, -1).cpu())
        out = torch.cat(rows, 0)
        self.embed_dim = int(out.shape[1])
        return out
