"""Tiny random vision-language models of the real classes, saved as the folders/files users have.

- ``make_blip`` / ``make_blip2`` / ``make_git``: transformers captioners (``from_pretrained`` folders with processor
  files; PIL image processors, a word-level BERT tokenizer);
- ``make_clip_towers``: a ``CLIPVisionModelWithProjection`` and a ``CLIPTextModelWithProjection``
  sharing a 16-d joint space, each in its own folder;
- ``make_open_clip``: an open_clip model of a tiny config, as a hub-style folder
  (``open_clip_config.json`` + ``open_clip_model.safetensors``) or a single weights file with a
  ``<stem>.json`` config beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CAPTION_WORDS = "a photo of the cat dog toy red blue car on with small".split()
_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def _bert_tokenizer(words=CAPTION_WORDS):
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(_SPECIAL + list(words))}
    tok = BertTokenizer(vocab=vocab)
    tok.bos_token = "[DEC]"
    return tok, vocab


def _never_stop(model, vocab) -> None:
    """Make special tokens unreachable so a random model always emits words (a non-empty caption)."""
    head = model.get_output_embeddings()
    if head is None:  # BLIP keeps its language-model head on the text decoder
        head = model.text_decoder.get_output_embeddings()
    with torch.no_grad():
        for t in _SPECIAL:
            head.bias[vocab[t]] = -1e4


def make_blip(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ``BlipForConditionalGeneration`` folder (BLIP's layout: config, weights, processor)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    tok, vocab = _bert_tokenizer()
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=vocab["[DEC]"], pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=32),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(cfg).eval()
    _never_stop(model, vocab)
    folder = Path(folder)
    model.save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


def make_git(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ``GitForCausalLM`` folder with a ``GitProcessor``."""
    from transformers import GitConfig, GitForCausalLM, GitProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    tok, vocab = _bert_tokenizer()
    cfg = GitConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=vocab["[CLS]"], eos_token_id=vocab["[SEP]"], pad_token_id=0,
    )
    model = GitForCausalLM(cfg).eval()
    _never_stop(model, vocab)
    folder = Path(folder)
    model.save_pretrained(folder)
    proc = GitProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                              crop_size={"height": 32, "width": 32}),
                        tokenizer=tok)
    proc.save_pretrained(folder)
    return folder


def make_blip2(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ``Blip2ForConditionalGeneration`` (ViT + Q-Former + OPT) folder with a ``Blip2Processor``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, PreTrainedTokenizerFast
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    torch.manual_seed(seed)
    specials = ["<pad>", "</s>", "<unk>", "<image>"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz")
                                        + ["\u0120" + w for w in CAPTION_WORDS])}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    n = len(tok)
    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=n),
        text_config=dict(model_type="opt", vocab_size=n, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                         num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # OPT's head has no bias: zero the special rows so words always win
        model.language_model.lm_head.weight[:len(specials)] = 0.0
        model.language_model.lm_head.weight[len(specials):] += 0.5
    folder = Path(folder)
    model.save_pretrained(folder)
    Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok,
                   num_query_tokens=4).save_pretrained(folder)
    return folder


CLIP_WORDS = "a photo of the cat dog toy red blue car on with small bright dark".split()


def make_clip_towers(root: str | os.PathLike, seed: int = 0, dim: int = 16) -> tuple[Path, Path]:
    """Tiny CLIP vision and text towers with projections into one ``dim``-d space: (vision, text) folders."""
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from inversion.hosts.hf import make_clip_tokenizer

    root = Path(root)
    vdir, tdir = root / "clip_vision", root / "clip_text"
    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=dim)
    CLIPVisionModelWithProjection(vcfg).save_pretrained(vdir)
    tok = make_clip_tokenizer(CLIP_WORDS, tdir)
    tcfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=dim,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    CLIPTextModelWithProjection(tcfg).save_pretrained(tdir)
    return vdir, tdir


OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 1},
}


def make_open_clip(open_clip, path: str | os.PathLike, layout: str = "folder", seed: int = 0) -> Path:
    """Save a tiny open_clip model where users put one.

    ``layout="folder"``: ``path/open_clip_config.json`` + ``path/open_clip_model.safetensors``;
    ``layout="file"``: ``path`` (a .safetensors file) with ``<stem>.json`` (the model config) beside it.
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = {"model_cfg": OPEN_CLIP_TINY,
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    tmp = path.parent / f".{path.name}.build"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "open_clip_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{tmp}", pretrained_image=False, pretrained_text=False).eval()
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "folder":
        path.mkdir(parents=True, exist_ok=True)
        with open(path / "open_clip_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f)
        save_file(sd, str(path / "open_clip_model.safetensors"))
    elif layout == "file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
        with open(path.with_suffix(".json"), "w", encoding="utf-8") as f:
            json.dump(OPEN_CLIP_TINY, f)
    else:
        raise ValueError(layout)
    return path
