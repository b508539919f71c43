"""`python -m fastgpt train | sample | bench` as a user runs them (subprocesses, tiny configs)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "64"]
FAST = ["--batch-size", "4", "--eval-iters", "2", "--log-interval", "1", "--no-progress"]


def fastgpt(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(
        [sys.executable, "-m", "fastgpt", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, f"fastgpt {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def step_of(out_dir) -> int:
    with open(os.path.join(out_dir, "train_state.json")) as f:
        return json.load(f)["step"]


def test_train_on_the_stdlib_then_resume_then_sample(tmp_path):
    out = tmp_path / "ckpt"
    log = fastgpt(
        "train", "--out", str(out), "--max-steps", "3", "--eval-interval", "2", *TINY, *FAST
    )
    assert "bytes of the Python standard library" in log
    assert "step 3/3 | loss" in log and "tok/s" in log
    assert "eval loss" in log
    assert sorted(os.listdir(out)) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "train_state.json",
    ]
    assert step_of(out) == 3
    assert_not_pickled(out)
    log = fastgpt("train", "--out", str(out), "--max-steps", "5", "--resume", *FAST)
    assert "resuming from step 3" in log
    assert "step 4/5" in log and "step 1/5" not in log
    assert step_of(out) == 5
    text = fastgpt(
        "sample", "--ckpt", str(out), "--prompt", "import os\n", "--max-new-tokens", "20"
    )
    assert text.startswith("import os\n")
    assert "20 tokens in" in text


def test_train_on_a_given_file_then_sample_greedy(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    out = tmp_path / "ckpt"
    log = fastgpt("train", "--data", str(data), "--out", str(out), "--max-steps", "4", *TINY, *FAST)
    assert f"bytes of {data}" in log
    assert step_of(out) == 4
    text = fastgpt(
        "sample",
        "--ckpt",
        str(out),
        "--prompt",
        "the ",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--backend",
        "reference",
    )
    assert text.startswith("the ")


def test_train_errors_are_clear(tmp_path):
    from fastgpt.cli import main

    with pytest.raises(SystemExit, match="no such file or folder"):
        main(["train", "--data", str(tmp_path / "missing.txt")])
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(SystemExit, match="fewer than block_size"):
        main(["train", "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o")])


def assert_not_pickled(out):
    """Every file the trainer writes is safetensors or JSON."""
    from safetensors import safe_open

    for name in os.listdir(out):
        path = out / name
        if name.endswith(".json"):
            json.loads(path.read_text())
        else:
            assert name.endswith(".safetensors")
            with safe_open(str(path), "pt") as f:
                assert list(f.keys())


def test_torchrun_ddp_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m fastgpt train` runs DDP on gloo, rank 0 writes."""
    out = tmp_path / "ckpt"
    port = str(29700 + os.getpid() % 200)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
    cmd += ["-m", "fastgpt", "train", "--out", str(out), "--max-steps", "2", *TINY, *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "world 2" in r.stdout
    assert r.stdout.count("saved checkpoint") == 1  # rank 0 only
    assert step_of(out) == 2
