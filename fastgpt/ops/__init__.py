"""One module per op: its custom-op schemas (namespace ``fastgpt``), fake implementations, CUDA
(Triton) registrations, and the autograd Function that calls only ``torch.ops.fastgpt.*``."""
