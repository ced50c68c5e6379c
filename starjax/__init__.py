"""starjax: STaR-family self-taught reasoning in JAX/Flax."""

__version__ = "0.1.0"
