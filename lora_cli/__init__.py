"""lora: LoRA and QLoRA fine-tuning driven by YAML recipes."""

import logging

# bitsandbytes warns at import time (which transformers' Trainer triggers) that an optional
# CPU kernel could not be fetched from a hub; it falls back by itself, so the notice is noise.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
