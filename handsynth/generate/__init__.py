"""``handsynth generate``: the work plan (a pure function of recipe and sample index), the driver that owns a
run directory (:mod:`.driver`) and the per-worker runner (:mod:`.runner`).

Heavy imports (torch, diffusers) happen inside the functions that need them.
"""
