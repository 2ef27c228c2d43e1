"""``loraforge serve``: LightX2V's API server for Wan models with LoRAs switched per request."""
