"""Training: base model, LoRA/QLoRA/full, launch configs, checkpoints."""
