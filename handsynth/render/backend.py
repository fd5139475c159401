"""Choose the headless OpenGL platform before OpenGL is first imported.

PyOpenGL binds its platform (EGL, OSMesa, GLX) once, when ``OpenGL.platform`` is first imported,
from the ``PYOPENGL_PLATFORM`` environment variable. handsynth renders headless with EGL unless
the user asks otherwise through ``HANDSYNTH_GL_PLATFORM`` (preferred) or ``PYOPENGL_PLATFORM``.
"""

from __future__ import annotations

import os
import sys

from handsynth.errors import HandsynthError

DEFAULT_PLATFORM = "egl"
PLATFORMS = ("egl", "osmesa", "glx")
_FIX = ("set HANDSYNTH_GL_PLATFORM to egl (default, Mesa or NVIDIA EGL) or osmesa (apt-get install libosmesa6, "
        "PyOpenGL>=3.1.4)")


def configure_platform() -> str:
    """Set ``PYOPENGL_PLATFORM`` for headless rendering and return the platform name.

    Order of choice: $HANDSYNTH_GL_PLATFORM, then $PYOPENGL_PLATFORM, then "egl". Raises
    HandsynthError when the name is unknown, or when OpenGL was already imported in this process
    with a different platform (it cannot be switched afterwards).
    """
    chosen = (os.environ.get("HANDSYNTH_GL_PLATFORM") or os.environ.get("PYOPENGL_PLATFORM")
              or DEFAULT_PLATFORM).strip().lower()
    if chosen not in PLATFORMS:
        raise HandsynthError(f"unknown OpenGL platform '{chosen}' (known: {', '.join(PLATFORMS)})",
                             where="HANDSYNTH_GL_PLATFORM / PYOPENGL_PLATFORM", fix=_FIX)
    loaded = sys.modules.get("OpenGL.platform")
    if loaded is not None:
        active = type(getattr(loaded, "PLATFORM", None)).__module__.rsplit(".", 1)[-1]
        if active != chosen:
            raise HandsynthError(
                f"OpenGL was already imported with the '{active}' platform, but '{chosen}' is needed",
                where="PYOPENGL_PLATFORM",
                fix=f"set PYOPENGL_PLATFORM={chosen} before starting Python, or import handsynth's "
                    "renderer before anything that imports OpenGL",
            )
    os.environ["PYOPENGL_PLATFORM"] = chosen
    return chosen
