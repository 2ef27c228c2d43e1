"""Checkpoint files: the safetensors format, reading by memory map, the output layout (names,
shards, offsets), streaming writers and atomic small files. Shared by every command."""
