"""fashion_func: a functional, JAX-style training library on PyTorch."""
