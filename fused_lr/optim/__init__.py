"""The fused optimizers, each a declaration on the shared core (fused_lr.core)."""
