"""LoRA files: the namings loraforge reads (key mapping onto a base), the naming it writes,
opening LoRA inputs (files, shard directories, PEFT adapters) and LoRA-list configs."""
