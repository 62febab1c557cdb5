"""The tensor-only core: the DiGSeg network, its diffusion maths, tensor geometry and metrics.

Imports torch, diffusers and transformers only: never files, PIL, OpenCV, Typer, Rich or device probing.
"""

# The two training objectives the core implements (DESIGN §1.5). Here, not in `diffusion`, so that the settings
# (`models.config`) validate against the same tuple without importing torch.
OBJECTIVES = ("one-step", "diffusion")
