"""``loraforge resize``: one or several LoRAs refactored into one LoRA at chosen ranks."""
