"""Developer tools run from the command line (`python -m starjax.tools.<name>`).

Nothing here is imported by the library; modules may set process-wide state (e.g. XLA_FLAGS)
before importing jax.
"""
