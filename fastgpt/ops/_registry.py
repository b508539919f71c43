"""Shared helper for defining fastgpt custom ops: one ``torch.library.Library`` for the namespace
and a Triton (CUDA) registration that imports triton only when a CUDA tensor arrives."""

from __future__ import annotations

import importlib

import torch

LIB = torch.library.Library("fastgpt", "DEF")


def define(schema: str, triton_module: str) -> str:
    """Define ``fastgpt::<schema>`` and register its CUDA kernel: the launcher of the same name in
    ``fastgpt.triton.<triton_module>``. Returns the qualified name."""
    name = schema.split("(", 1)[0]
    LIB.define(schema)
    qualname = f"fastgpt::{name}"

    def cuda_kernel(*args, **kwargs):
        launcher = getattr(importlib.import_module(f"fastgpt.triton.{triton_module}"), name)
        return launcher(*args, **kwargs)

    torch.library.register_kernel(qualname, "cuda", cuda_kernel, lib=LIB)
    return qualname
