"""A LoRA on a ComfyUI MODEL for pivotal tuning, made of ComfyUI's own training adapters.

``add_lora`` makes, for every attention projection the ``LoraSpec`` selects, the adapter core's Train LoRA
node makes (``comfy.weight_adapter.LoRAAdapter.create_train``: up Kaiming-uniform, down zeros, so the
model is unchanged at step 0) and registers it as a weight wrapper on the patcher
(``ModelPatcher.add_weight_wrapper``): when that patcher is loaded, each layer computes with
W + (alpha / r) up @ down, and autograd reaches up and down. The layers go to the trainer as the
library's ``LoraLayers`` group (own AdamW, start fraction, exact resume, kohya file layout).

Wrappers belong to the patcher they were added to: add them to a clone (``lora_clone``), never to the
MODEL the graph passes on, or every later sampler would run the untrained adapters too. ComfyUI wipes
a patcher's weight functions when it unloads it (``wipe_lowvram_weight``), so sampling with the original
MODEL afterwards loads it without them.
"""

from __future__ import annotations

import torch

from ..inversion.lora import LoraLayers, LoraSpec, lora_targets

__all__ = ["add_lora", "lora_clone", "UNET_PREFIX"]

UNET_PREFIX = "diffusion_model."  # a MODEL's weight keys: diffusion_model.<LDM module path>.weight


def add_lora(patcher, spec: LoraSpec, steps: int, *, seed: int = 0) -> LoraLayers:
    """LoRA adapters on ``patcher``'s UNet (call before it is loaded for training) as a parameter group.
    Module paths are the LDM UNet's (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), which is what
    the kohya keys of ``LoraLayers.kohya_state_dict`` and ComfyUI's LoRA loader use."""
    from comfy.weight_adapter import LoRAAdapter

    spec = spec.validate()
    unet = patcher.model.diffusion_model
    layers = {}
    # Outside inference mode (a prompt runs under it): inference tensors cannot train. Up's Kaiming init
    # comes from the run's seed, the caller's RNG untouched.
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path in lora_targets(unet, spec):
            weight = unet.get_submodule(path).weight
            adapter = LoRAAdapter.create_train(weight, rank=spec.rank, alpha=spec.alpha)
            patcher.add_weight_wrapper(f"{UNET_PREFIX}{path}.weight", adapter)
            layers[path] = (adapter.lora_down.weight, adapter.lora_up.weight)
    return LoraLayers(spec, steps, layers)


def lora_clone(model, spec: LoraSpec, steps: int, *, seed: int = 0):
    """(a clone of ``model`` carrying the adapters, the group): the MODEL the graph holds stays as it was."""
    clone = model.clone()
    return clone, add_lora(clone, spec, steps, seed=seed)
