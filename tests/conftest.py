"""Shared test setup.

Triton's interpreter must be switched on before triton is first imported, so it happens here,
before any test module loads: the "triton" backend then runs the Triton kernels on CPU tensors.
On a GPU machine, FASTGPT_TEST_GPU=1 leaves Triton compiling for the device instead; the kernel
tests that always run under the interpreter load their module through `load_interpreted`.
"""

import os

if os.environ.get("FASTGPT_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import fastgpt  # noqa: E402
from fastgpt import _cpu  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None

# Every backend the tests hold against torch: the reference, the C++ kernels on every ISA build
# this CPU can run, and the Triton kernels under the interpreter.
CPU_BACKENDS = [f"cpu-{isa}" for isa in _cpu.supported_isas()]
BACKENDS = ["reference", *CPU_BACKENDS] + (["triton"] if HAS_TRITON else [])

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
}


# The library of the kernels' fp32 matrix products (csrc/gemm.h) rides along with the ISA build:
# the build decides fastgpt's own vector code, the library the products, and the two are
# independent, so pairing them covers both libraries in every op's tests without running them
# all twice. "onednn" sends every product there, below the size threshold "auto" keeps on MKL.
GEMM_FOR_ISA = {"default": "auto", "avx2": "aten", "avx512": "onednn"}


def run_on(backend: str):
    """Context manager running fastgpt ops on ``backend`` ("cpu-avx2" = C++ kernels, AVX2 build,
    with GEMM_FOR_ISA's product library)."""
    from contextlib import ExitStack

    stack = ExitStack()
    if backend.startswith("cpu-"):
        stack.enter_context(fastgpt.use_backend("cpu"))
        stack.enter_context(_cpu.use_isa(backend[4:]))
        stack.enter_context(_cpu.use_gemm(GEMM_FOR_ISA[backend[4:]]))
    else:
        stack.enter_context(fastgpt.use_backend(backend))
    return stack


@pytest.fixture(params=BACKENDS)
def backend(request):
    with run_on(request.param):
        yield request.param


def assert_close(actual, expected, dtype, scale=1.0, equal_nan=False):
    """torch.testing.assert_close at TOLERANCES[dtype], both tolerances times ``scale``."""
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual,
        expected,
        atol=tol["atol"] * scale,
        rtol=tol["rtol"] * scale,
        equal_nan=equal_nan,
    )


def assert_compiled_matches_eager(compiled, eager, ins, dy):
    """``compiled(*ins)`` equals ``eager(*ins)`` in fp32, and so do the gradients of every input
    for the upstream gradient ``dy`` (summed in other orders: 4x the tolerance)."""
    out, out_e = compiled(*ins), eager(*ins)
    assert_close(out, out_e, torch.float32)
    for g, e in zip(torch.autograd.grad(out, ins, dy), torch.autograd.grad(out_e, ins, dy)):
        assert_close(g, e, torch.float32, 4)


def reduction_scale(terms):
    """Tolerance factor for a sum of ``terms`` values: summed in a different order, its rounding
    error grows like sqrt(terms) (at least 4x the elementwise tolerance)."""
    return max(4.0, terms**0.5)


def saved_bytes_beyond(fn, keep):
    """``(bytes, fn())``: what autograd saves for the backward while ``fn()`` runs, each storage
    counted once however many tensors view it, leaving out the storages of the tensors ``keep``
    (inputs or parameters, which exist anyway)."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    skip = {t.untyped_storage().data_ptr() for t in keep}
    return sum(n for ptr, n in saved.items() if ptr not in skip), out


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` added to this one's environment (for
    settings read once per process); assert it exits 0 and return its stripped stdout."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def cpp_input_checks(bad_calls):
    """The test of a module's ``bad_calls`` ({case: (call, message)}): each call into the C++
    kernels (best ISA build) raises a RuntimeError matching its message. Use it as
    ``test_cpp_input_checks = cpp_input_checks(BAD_CALLS)``."""

    @pytest.mark.parametrize("case", list(bad_calls))
    def test_cpp_input_checks(case):
        call, message = bad_calls[case]
        with _cpu.use_isa(_cpu.supported_isas()[-1]), pytest.raises(RuntimeError, match=message):
            call()

    return test_cpp_input_checks


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: the models of the model and patch tests are tiny, and
    on a busy machine OpenMP threads waiting on each other cost far more than they bring."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_gpt2(seed=0, **kw):
    """A tiny transformers GPT2LMHeadModel (2 layers, 64 wide, 97 tokens), no dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=64,
        n_positions=64,
        vocab_size=97,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return GPT2LMHeadModel(cfg)


@contextmanager
def _interpret_env():
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        # Leave the environment as found: on a GPU run (FASTGPT_TEST_GPU=1) the kernels other
        # tests import later must compile for the device.
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


@contextmanager
def _fresh_submodules(package: str):
    """Inside, ``package``'s submodules are imported afresh; afterwards ``sys.modules`` and the
    package's attributes are as found, so what was imported inside stays private to its importer."""
    parent = importlib.import_module(package)
    prefix = package + "."
    saved = {name: m for name, m in sys.modules.items() if name.startswith(prefix)}
    saved_attrs = dict(vars(parent))
    for name in saved:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [name for name in sys.modules if name.startswith(prefix)]:
            del sys.modules[name]
        sys.modules.update(saved)
        for attr in set(vars(parent)) - set(saved_attrs):
            delattr(parent, attr)
        for attr, value in saved_attrs.items():
            setattr(parent, attr, value)


def load_interpreted(module_name: str):
    """A private copy of the Triton kernel module ``module_name`` whose kernels are interpreter
    objects (@triton.jit reads TRITON_INTERPRET as it decorates), even where another test already
    imported the module with compiled kernels (a GPU run). The shared helpers it imports
    (fastgpt.triton._reduce) are private interpreted copies too, and the shared modules the rest
    of the session uses are left untouched. Skips the calling test module when triton is not
    installed. Its tests also need the ``triton_interpreter`` fixture."""
    with _interpret_env():
        pytest.importorskip("triton")
        origin = importlib.util.find_spec(module_name).origin
        private_name = f"_{module_name.rpartition('.')[2]}_interpreted"
        spec = importlib.util.spec_from_file_location(private_name, origin)
        module = importlib.util.module_from_spec(spec)
        with _fresh_submodules(module_name.rpartition(".")[0]):
            spec.loader.exec_module(module)
    return module


@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 while a test runs: the interpreter reads it during execution too.
    Use with ``pytestmark = pytest.mark.usefixtures("triton_interpreter")``."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
