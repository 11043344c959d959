"""The Llama network and nothing else: config, module, kernels, Hugging Face weight I/O."""
