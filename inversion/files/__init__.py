"""Files and formats: embedding layouts other UIs read and write, a run's checkpoint, atomic safetensors writes and weights_only reads."""
