"""``handsynth generate``: the work plan (a pure function of recipe and sample index) and the local runner.

Heavy imports (torch, diffusers) happen inside the functions that need them.
"""
