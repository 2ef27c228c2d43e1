"""LoRAs applied to a live model: ``apply`` patches a ``torch.nn.Module`` or a state dict in
place, its handle changes strengths, adds or removes LoRAs and restores the original bytes."""
