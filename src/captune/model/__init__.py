"""The model: loading checkpoints, the LoRA adapters on them, and what each family supports."""
