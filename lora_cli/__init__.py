"""lora: LoRA and QLoRA fine-tuning driven by YAML recipes."""

__version__ = "0.1.0"
