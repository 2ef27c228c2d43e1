"""``loraforge merge``: plan from headers (which LoRA tensors patch which base tensor), one task
per base tensor writing its bytes in place, and resume of an interrupted merge."""
