"""Triton kernels for CUDA devices: one module per op, each with its @triton.jit kernels and the
plain-Python launchers that allocate outputs and launch them.

Nothing here is imported by the rest of the package unless the Triton backend is used, so fastgpt
imports (and its CPU path works) where triton is absent. `python -m fastgpt.triton.report`
compiles every kernel ahead of time for sm_80 and sm_90a and prints its resource usage.
"""
