"""Geometry (cameras, projection, boxes), the pyrender hand renderer and the render stage.

    render_run(labels_path, out, ...) -> RunSummary      (handsynth.render.stage)
    HandRenderer(style).render(meshes, views)            (handsynth.render.renderer)

Import the submodules directly; this package imports nothing heavy (OpenGL must be configured
by handsynth.render.backend.configure_platform before pyrender is imported).
"""
