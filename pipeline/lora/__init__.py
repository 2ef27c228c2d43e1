"""LoRA names and formats: every naming loraforge reads (mapped onto a base or by its own module
names), each key style it writes, LoRA files, shard directories and PEFT adapters opened with
their alphas and scales, and the configs that list LoRAs with strengths. Writing a LoRA is
``pipeline/export/``."""
