"""Writing LoRAs: the ranks chosen from the spectra a run stored (``ranks.py``), the outputs laid
out at those ranks (``outputs.py``), finished results cast and written into them
(``write.py``), and the one LoRA writer every command writes through (``writer.py``)."""
