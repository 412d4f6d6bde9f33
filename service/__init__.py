"""The Piggyback model server: FastAPI routes, engine, batcher, mask-apply kernels, metrics."""
