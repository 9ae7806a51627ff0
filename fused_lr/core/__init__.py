"""The optimizer core every fused optimizer shares: validation, state, the step plan."""
