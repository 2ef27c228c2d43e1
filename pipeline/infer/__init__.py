"""``loraforge infer``: one video from a Wan model folder with LoRAs, LightX2V's command line."""
