"""Training: the loop behind `digseg train` (`loop`) with its samples, loss, a compact base's VAE stage,
validation through `digseg eval`'s scorer and resumable state; and the fast decoder's distillation."""
