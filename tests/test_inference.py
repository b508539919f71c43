"""Inference calls (grad mode off, or no input that requires grad) run the kernels' forward ops
directly, without an autograd Function (_backend.apply): the same values, bit for bit, as the
recorded forward, and nothing kept for a backward."""

import pytest
import torch
from conftest import BACKENDS, run_on

import fastgpt.functional as F

TENSOR_BACKENDS = [b for b in BACKENDS if b != "reference"]  # the reference has no Functions


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return dict(
        x=r(2, 5, 48),
        res=r(2, 5, 48),
        w=r(48),
        b=r(48),
        lw=r(24, 48),
        lb=r(24),
        logits=r(7, 33),
        target=torch.randint(0, 33, (7,), generator=g),
        q=r(1, 2, 9, 16),
        k=r(1, 2, 11, 16),
        v=r(1, 2, 11, 16),
    )


CALLS = {
    "linear": lambda t: F.linear(t["x"], t["lw"], t["lb"]),
    "layer_norm": lambda t: F.layer_norm(t["x"], (48,), t["w"], t["b"]),
    "layer_norm_2d": lambda t: F.layer_norm(t["x"][0], (48,), t["w"], None),
    "add_layer_norm": lambda t: F.add_layer_norm(t["x"], t["res"], (48,), t["w"], t["b"]),
    "layer_norm_linear": lambda t: F.layer_norm_linear(
        t["x"], (48,), t["w"], t["b"], t["lw"], t["lb"]
    ),
    "add_layer_norm_linear": lambda t: F.add_layer_norm_linear(
        t["x"], t["res"], (48,), t["w"], t["b"], t["lw"], t["lb"]
    ),
    "gelu": lambda t: F.gelu(t["x"]),
    "bias_gelu": lambda t: F.bias_gelu(t["x"], t["b"]),
    "bias_gelu_linear": lambda t: F.bias_gelu_linear(t["x"], t["b"], t["lw"], t["lb"]),
    "cross_entropy": lambda t: F.cross_entropy(t["logits"], t["target"], label_smoothing=0.1),
    "cross_entropy_none": lambda t: F.cross_entropy(
        t["logits"], t["target"], reduction="none", ignore_index=3
    ),
    "attention": lambda t: F.scaled_dot_product_attention(t["q"], t["k"], t["v"], is_causal=True),
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", CALLS)
@pytest.mark.parametrize("backend", TENSOR_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inference_skips_autograd_and_matches_the_recorded_forward(
    name, backend, dtype, monkeypatch
):
    call = CALLS[name]
    t = _inputs(dtype)
    with run_on(backend):
        recorded = _as_tuple(
            call({k: v.requires_grad_() if v.is_floating_point() else v for k, v in t.items()})
        )
        assert all(o.grad_fn is not None for o in recorded)  # the Function ran
        t = {k: v.detach() for k, v in t.items()}

        def no_function(cls, *args, **kwargs):
            raise AssertionError(f"{cls.__name__}.apply called for an inference call")

        monkeypatch.setattr(torch.autograd.Function, "apply", classmethod(no_function))
        for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
            with mode():  # enable_grad: no input requires grad, so nothing to record
                got = _as_tuple(call(t))
            assert len(got) == len(recorded)
            for g, r in zip(got, recorded):
                assert g.grad_fn is None and g.shape == r.shape and g.dtype == r.dtype
                assert torch.equal(g, r.detach()), f"{name} under {mode.__name__}"
