"""The tensor-only core: the DiGSeg network, its diffusion maths, tensor geometry and metrics.

Imports torch, diffusers and transformers only: never files, PIL, OpenCV, Typer, Rich or device probing.
"""
