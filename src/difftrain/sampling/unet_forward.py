"""A UNet's forward replaced for one draw, and put back as it was found."""

from __future__ import annotations

import contextlib
from typing import Callable


@contextlib.contextmanager
def replaced_forward(unet, wrap: Callable):
    """`unet.forward` is `wrap(the forward it had)` inside the block. Put back as found: accelerate's offload hook
    (an instance attribute) or none (the class's own forward); a hook put back during the block stays. Blocks nest
    (prompt composing inside an inpainting blend), each wrapping the one before."""
    had_own, original = "forward" in unet.__dict__, unet.forward
    forward = wrap(original)
    unet.forward = forward
    try:
        yield
    finally:
        if unet.__dict__.get("forward") is forward:
            if had_own:
                unet.forward = original
            else:
                del unet.forward
