"""Drawing images from diffusion models, knowing nothing of files or training.

Scheduler names, the A1111 prompt syntax, the sampling loop and image grids: a leaf that
every other part of difftrain may import (training previews and `generate` alike).
"""
