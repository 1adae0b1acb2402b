"""The small offline bases `lora build-tiny` writes (tests and the demo use them)."""
