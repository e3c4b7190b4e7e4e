"""captune: adapt BLIP-2 image captioners to a domain with LoRA, measured the COCO way."""

__version__ = "0.1.0"
