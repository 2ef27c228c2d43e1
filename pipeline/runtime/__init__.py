"""The Wan inference runtime under ``loraforge infer`` and ``loraforge serve``: a diffusers
Wan pipeline loaded from a model folder, LightX2V's config fields mapped onto it, LoRAs patched
in and switched through ``loraforge.apply``, videos written."""
