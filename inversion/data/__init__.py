"""Data and prompts: concept images from folders, image preparation, prompt templates and token slots, and what a training step draws. Also holds the ImageNet class names (imagenet_classes.txt)."""
