"""New, exactly labelled hand configurations from a label set (``handsynth augment``).

Pure pieces: ``rotation`` (slerp, geodesic angles), ``limits`` (anatomical joint frames and limits of
the MANO finger joints), ``camera`` (orbit placement that keeps the hands in the image),
``penetration`` (two-mesh interpenetration depth with trimesh), ``summary`` (distances to the source
poses, viewpoint coverage). ``recipe`` is the validated YAML schema, ``sample`` draws frame i from
(recipe seed, i), ``command`` is the thin CLI.
"""
