"""Pure NNX modules and pure functions. Imports nothing else of the package (not data/, diffusion/,
train/ or main), so a sampler or an exported artifact can depend on it alone."""
