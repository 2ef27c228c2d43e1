"""``loraforge verify``: how closely base + LoRAs reproduce a fine-tuned checkpoint."""
