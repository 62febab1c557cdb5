"""Training: the loop behind `digseg train`, its samples, its resumable state, and the fast decoder's
distillation."""
