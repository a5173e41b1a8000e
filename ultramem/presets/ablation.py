"""The UltraMem Table 2 ablation ladder (filled in with the layers)."""
