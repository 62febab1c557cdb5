"""Inference: the pipeline (numbered steps from an image and prompts to probabilities), devices and
precision, prompts, and images in and out."""
