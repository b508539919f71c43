"""fastgpt bench and its case builders, on tiny shapes (no timing is asserted)."""

import pathlib

import pytest
import torch

from fastgpt import bench, bench_cases

TINY = {
    "linear": (16, 32, 24),
    "layer_norm": (16, 32),
    "add_layer_norm": (16, 32),
    "gelu_tanh": (16, 32),
    "gelu_erf": (16, 32),
    "bias_gelu_tanh": (16, 32),
    "bias_gelu_erf": (16, 32),
    "cross_entropy": (16, 50),
    "linear_cross_entropy": (16, 32, 50),
    "attention": (2, 3, 16, 16, 8),
    "attention_dropout": (2, 3, 16, 16, 8),
    "attention_gqa": (2, 6, 2, 16, 16, 8),
}
# Ops whose contenders draw their own random masks: they agree in shape, not in value.
STOCHASTIC = {"attention_dropout"}


def test_every_op_has_a_tiny_case():
    assert sorted(TINY) == sorted(bench_cases.ops())


def test_every_op_has_a_benchmark_suite():
    # The pytest-benchmark suites name their ops in params("op", ...) calls.
    root = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
    text = "\n".join(p.read_text() for p in root.glob("test_bench_*.py"))
    assert [op for op in bench_cases.ops() if f'"{op}"' not in text] == []


@pytest.mark.parametrize("plan", ["QUICK", "FULL"])
def test_every_op_is_in_both_bench_modes(plan):
    # `fastgpt bench --ops X` must have something to run for every op, quick or --full.
    assert {row[0] for row in getattr(bench, plan)} == set(bench_cases.ops())


@pytest.mark.parametrize("mode", bench_cases.MODES)
@pytest.mark.parametrize("op", sorted(TINY))
def test_contenders_compute_the_same_thing(op, mode):
    """Every contender of a case (but compile, torch's own, and the floor, which is no
    implementation) gives fastgpt's result, so the benchmarks compare like with like."""
    others = [c for c in bench_cases.contenders(op) if c not in ("compile", "floor")]
    case = bench_cases.make_case(op, TINY[op], torch.float32, mode, contenders=others)
    assert set(case.calls) == set(others) and not case.skipped
    want = case.calls["fastgpt"]()
    for name in others:
        got = case.calls[name]()
        if op in STOCHASTIC:
            assert [g.shape for g in _tensors(got)] == [w.shape for w in _tensors(want)]
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{op} {name}")
    assert case.flops > 0 and case.bytes > 0


def _tensors(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def test_attention_dropout_case_drops():
    """The dropout case runs the same attention as the plain one, with dropout on: its outputs
    differ from the plain case's, and by a different mask on each call."""
    shape = TINY["attention"]
    plain = bench_cases.make_case("attention", shape, torch.float32, "fwd", contenders=("fastgpt",))
    drop = bench_cases.make_case(
        "attention_dropout", shape, torch.float32, "fwd", contenders=("fastgpt", "eager")
    )
    base = plain.calls["fastgpt"]()
    for name in ("fastgpt", "eager"):
        a, b = drop.calls[name](), drop.calls[name]()
        assert a.shape == base.shape and not torch.equal(a, base) and not torch.equal(a, b)
    assert drop.flops == plain.flops and drop.bytes == plain.bytes


def test_memory_floor_moves_the_least_data():
    """The floor's forward copies x into a fresh tensor, its backward returns dy + x for x and
    zeros for the vectors: the traffic of the op without its arithmetic."""
    x, w = torch.randn(5, 7, requires_grad=True), torch.randn(7, requires_grad=True)
    y = bench_cases.memory_floor(x, w)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    dy = torch.randn(5, 7)
    dx, dw = torch.autograd.grad(y, [x, w], dy)
    torch.testing.assert_close(dx, dy + x)
    assert dw.shape == w.shape and not dw.any()
    # One gradient per differentiated input: x, and weight and bias or the GELU bias.
    leaves = {"layer_norm": 3, "gelu_tanh": 1, "gelu_erf": 1, "bias_gelu_tanh": 2}
    for op, n in leaves.items():
        case = bench_cases.make_case(op, TINY[op], torch.float32, "fwd+bwd", contenders=("floor",))
        assert len(case.calls["floor"]()) == n


def test_naive_attention_is_skipped_with_a_reason_past_its_memory_limit():
    # (1, 12, 8192, 8192) scores: 3.2 GB per tensor, about eight of them in fwd+bwd.
    case = bench_cases.make_case(
        "attention", (1, 12, 8192, 8192, 64), torch.float32, "fwd", "cpu", contenders=("naive",)
    )
    assert not case.calls and "GB" in case.skipped["naive"]


def test_table_states_ratios_and_skips(monkeypatch):
    monkeypatch.setattr(bench_cases, "NAIVE_MAX_GB", 0.0)
    plan = [("attention", TINY["attention"], [torch.float32], ["fwd+bwd"])]
    rows = bench.run_rows(
        plan, "cpu", repeat=1, contenders=("fastgpt", "eager", "naive"), log=lambda line: None
    )
    table = bench.format_table(rows, "cpu")
    assert "attention-2x3x16x16x8-float32-fwd+bwd" in table
    assert "eager x" in table and "not run*" in table and "* naive: naive attention" in table


def test_plot_draws_the_sweeps(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    tiny = bench_cases.Sweep(
        "gelu_tanh",
        "rows",
        [(8, (8, 32)), (16, (16, 32))],
        "GB/s",
        lambda case, t: case.bytes / t / 1e9,
    )
    monkeypatch.setattr(bench_cases, "_SWEEPS", [tiny])
    monkeypatch.setattr(
        bench_cases, "_CONTENDERS", {**bench_cases._CONTENDERS, "gelu_tanh": ("fastgpt", "eager")}
    )
    out = tmp_path / "bench.png"
    bench.plot(str(out), "cpu", repeat=1, log=lambda line: None)
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_unknown_op_is_refused_with_the_list():
    with pytest.raises(SystemExit, match="no op nope; ops: linear layer_norm"):
        bench.main(["--ops", "nope"])


@pytest.mark.parametrize("t_q", [1, 3], ids=["decode", "speculative"])
def test_attention_gqa_decode_case_agrees(t_q):
    """The decode forms give torch's result: Tq = 1 (fastgpt folds the query groups) and a few
    causal rows against the cache (eager given the bottom-right mask, fastgpt per group member);
    the FLOPs count the keys the mask leaves."""
    case = bench_cases.make_case("attention_gqa", (2, 8, 2, t_q, 40, 16), torch.float32, "fwd")
    want = case.calls["eager"]()
    for name in ("fastgpt", "compile"):
        torch.testing.assert_close(case.calls[name](), want, rtol=1e-4, atol=1e-5, msg=name)
    visible = 40 if t_q == 1 else 38 + 39 + 40
    assert case.flops == pytest.approx(4.0 * 2 * 8 * visible * 16)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        bench_cases.make_case("attention_gqa", (1, 6, 4, 1, 8, 16), torch.float32, "fwd")
    with pytest.raises(ValueError, match="1 <= Tq <= Tk"):
        bench_cases.make_case("attention_gqa", (1, 8, 2, 9, 8, 16), torch.float32, "fwd")
