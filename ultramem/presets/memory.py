"""UltraMem / UltraMemV2 presets (filled in with the layers)."""
