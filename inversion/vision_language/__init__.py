"""The vision-language helpers: captions of the concept images, zero-shot class labels, CLIP scores of previews, model downloads."""
