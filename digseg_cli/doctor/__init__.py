"""`digseg doctor`: what this machine has, what digseg would pick on it, and whether the built-in model runs."""
