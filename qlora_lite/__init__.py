"""qlora_lite: QLoRA fine-tuning on one consumer GPU, with the memory planned before and watched during."""

__version__ = "0.1.0"
