"""Text in, token batches out. Runs on the CPU; knows nothing of the model or the training loop."""
