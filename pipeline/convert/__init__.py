"""``loraforge convert``: a LoRA from any naming loraforge reads into any key style it writes."""
