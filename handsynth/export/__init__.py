"""The export stage: a generate run -> WebDataset shards of generated images + their original 3D labels.

:func:`~handsynth.export.webdataset.export_run` writes the shards, :func:`~handsynth.export.webdataset.verify_shards`
reads them back; :mod:`handsynth.export.hamer` builds the optional HaMeR-compatible ``data.pyd`` annotations.
"""
