"""AttentionHand (ECCV 2024) in diffusers form: guidance module, TAS, pipeline, loading, conversion.

Heavy imports (torch, diffusers) happen when a submodule is imported, not here.
"""
