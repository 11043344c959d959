"""How a run is driven: flags, plugins, the training step and loop, checkpoints, metrics."""
