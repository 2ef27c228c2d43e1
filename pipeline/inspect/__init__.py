"""``loraforge inspect``: what a LoRA holds, read-only."""
