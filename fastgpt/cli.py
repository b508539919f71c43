"""The ``fastgpt`` command: ``train``, ``sample`` and ``bench``.

    fastgpt train                          # byte-level GPT on this Python's own standard library
    fastgpt train --data notes.txt --out ckpt --max-steps 2000
    torchrun --nproc_per_node 2 -m fastgpt train --max-steps 200     # DistributedDataParallel
    fastgpt sample --ckpt ckpt --prompt "def main(" --max-new-tokens 200 --top-k 40

Training is offline by construction: with no ``--data`` the corpus is the ``*.py`` source of the
Python standard library found on this machine at run time; tokens are bytes (vocab 256), so no
tokenizer is needed. Checkpoints are safetensors + JSON only (model, optimizer state, step):
nothing is pickled, nothing is unpickled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

# ---- data -------------------------------------------------------------------------------------


def stdlib_files() -> list[str]:
    """The standard library's own ``*.py`` files (no site-packages, no test suites)."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    if not found:
        raise SystemExit(f"no *.py files under the standard library folder {root}; pass --data")
    return found


def text_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise SystemExit(f"--data {path}: no such file or folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return found


def load_corpus(data: str | None) -> torch.Tensor:
    """All text as one uint8 tensor of bytes; binary files (any NUL byte) are skipped."""
    files = stdlib_files() if data is None else text_files(data)
    chunks = []
    for f in files:
        with open(f, "rb") as fh:
            b = fh.read()
        if b and b"\0" not in b:
            chunks.append(b if b.endswith(b"\n") else b + b"\n")
    corpus = b"".join(chunks)
    if not corpus:
        raise SystemExit(f"no text found in {data or 'the standard library'}")
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


@dataclass
class Batches:
    """Random windows of a token stream, identical on every rank for a given step: the global
    batch of ``batch_size * world`` rows is drawn from (seed, step), and each rank takes its own
    rows. So N processes see exactly what one process with an N-times larger batch sees."""

    tokens: torch.Tensor
    block_size: int
    batch_size: int  # per rank
    rank: int = 0
    world: int = 1
    seed: int = 0

    def get(self, step: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.tokens) - self.block_size - 1
        if n <= 0:
            raise SystemExit(
                f"the corpus split has {len(self.tokens)} bytes: fewer than block_size + 1"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, n, (self.batch_size * self.world,), generator=g)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        offs = torch.arange(self.block_size + 1)
        rows = self.tokens[starts[:, None] + offs].long()
        return rows[:, :-1].to(device), rows[:, 1:].to(device)


# ---- checkpoints (safetensors + JSON) ---------------------------------------------------------


def save_checkpoint(out: str, model, optimizer, step: int, info: dict) -> None:
    from safetensors.torch import save_file

    model.save(out)
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, os.path.join(out, "optimizer.safetensors"))
    meta = {"step": step, "param_groups": sd["param_groups"], "scalars": scalars, **info}
    tmp = os.path.join(out, "train_state.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(out, "train_state.json"))  # written last: marks a whole ckpt


def load_train_state(out: str, optimizer, device) -> int:
    """Restore the optimizer from ``out`` and return the step it had reached."""
    from fastgpt.model import _read_json, _read_safetensors

    meta = _read_json(os.path.join(out, "train_state.json"))
    tensors = _read_safetensors(os.path.join(out, "optimizer.safetensors"))
    state: dict = {}
    for key, t in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = t.to(device) if k != "step" else t
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(meta["step"])


# ---- distributed ------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then join the process group (NCCL on CUDA,
    gloo on CPU). Without them this is a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return Dist(rank=dist.get_rank(), local_rank=local, world=dist.get_world_size())


# ---- train ------------------------------------------------------------------------------------


def _progress(total: int, initial: int, enabled: bool):
    """A tqdm bar when tqdm is installed, else None (plain prints)."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)


def _lr(step: int, args) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak at max_steps (as nanoGPT)."""
    warmup = max(1, min(args.warmup, args.max_steps // 10))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, args.max_steps - warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args) -> int:
    import fastgpt
    from fastgpt.model import GPT, GPTConfig

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = init_distributed(device)
    if dist.world > 1 and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
    say = print if dist.main else (lambda *a, **k: None)

    tokens = load_corpus(args.data)
    split = int(len(tokens) * 0.9)
    source = args.data or "the Python standard library"
    say(
        f"corpus: {len(tokens):,} bytes of {source} (train {split:,}, eval {len(tokens) - split:,})"
    )

    resume = args.resume and os.path.isfile(os.path.join(args.out, "train_state.json"))
    torch.manual_seed(args.seed)
    if resume:
        model = GPT.load(args.out, dropout=args.dropout)
    else:
        config = GPTConfig(
            block_size=args.block_size,
            vocab_size=256,
            n_layer=args.n_layer,
            n_head=args.n_head,
            n_embd=args.n_embd,
            dropout=args.dropout,
        )
        model = GPT(config)
    model.to(device)
    block = model.config.block_size
    train_data = Batches(tokens[:split], block, args.batch_size, dist.rank, dist.world, args.seed)
    eval_data = Batches(
        tokens[split:], block, args.batch_size, dist.rank, dist.world, args.seed + 1
    )

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay
    )
    step = load_train_state(args.out, optimizer, device) if resume else 0
    if resume:
        say(f"resuming from step {step} in {args.out}")
    say(
        f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config}; backend "
        f"{args.backend or 'by device'}, device {device}, dtype {args.dtype}, world {dist.world}"
    )

    net = torch.compile(model) if args.compile else model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[dist.local_rank] if device.startswith("cuda") else None)

    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
        if args.dtype == "bfloat16"
        else contextlib.nullcontext()
    )

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad(), autocast:
            for i in range(args.eval_iters):
                x, y = eval_data.get(i, device)
                losses.append(net(x, y)[1].float())
        model.train()
        loss = torch.stack(losses).mean()
        if dist.world > 1:
            torch.distributed.all_reduce(loss)
            loss /= dist.world
        return loss.item()

    bar = _progress(args.max_steps, step, dist.main and not args.no_progress)
    tokens_per_step = args.batch_size * dist.world * block
    backend = fastgpt.use_backend(args.backend) if args.backend else contextlib.nullcontext()
    val = None
    with backend:
        t0, t_step0 = time.perf_counter(), step
        while step < args.max_steps:
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, args)
            x, y = train_data.get(step, device)
            with autocast:
                _, loss = net(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            last = step == args.max_steps
            if step % args.log_interval == 0 or last:
                dt = time.perf_counter() - t0
                tps = tokens_per_step * (step - t_step0) / max(dt, 1e-9)
                msg = f"step {step}/{args.max_steps} | loss {loss.item():.4f} | {tps:,.0f} tok/s"
                if bar is not None:
                    bar.set_postfix_str(f"loss {loss.item():.4f}, {tps:,.0f} tok/s")
                else:
                    say(msg)
                t0, t_step0 = time.perf_counter(), step
            if bar is not None:
                bar.update(1)
            if step % args.eval_interval == 0 or last:
                val = evaluate()
                line = f"step {step}: eval loss {val:.4f} ({val / math.log(2):.3f} bits/byte)"
                (bar.write if bar is not None else say)(line)
                if dist.main:
                    save_checkpoint(args.out, model, optimizer, step, {"eval_loss": val})
                    (bar.write if bar is not None else say)(f"saved checkpoint to {args.out}")
    if bar is not None:
        bar.close()
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    say(f"done: step {step}" + (f", eval loss {val:.4f}" if val is not None else ""))
    return 0


# ---- sample -----------------------------------------------------------------------------------


def sample(args) -> int:
    from fastgpt.model import GPT

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT.from_pretrained(args.ckpt).to(device).eval()
    if model.config.vocab_size == 256:  # byte-level, as `fastgpt train` makes
        encode = lambda s: list(s.encode("utf-8"))
        decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")
    else:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.tokenizer or args.ckpt, local_files_only=True)
        except Exception as e:
            raise SystemExit(
                f"{args.ckpt} has a {model.config.vocab_size}-token vocabulary: sampling needs its "
                f"tokenizer on this machine (--tokenizer NAME_OR_PATH): {e}"
            ) from None
        encode, decode = tok.encode, tok.decode
    ids = encode(args.prompt) or [ord("\n")]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(args.seed)
    backend = contextlib.nullcontext()
    if args.backend:
        import fastgpt

        backend = fastgpt.use_backend(args.backend)
    with backend:
        t0 = time.perf_counter()
        out = model.generate(
            idx,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=g,
        )
        dt = time.perf_counter() - t0
    print(decode(out[0].tolist()))
    print(
        f"[{args.max_new_tokens} tokens in {dt:.2f} s: {args.max_new_tokens / dt:.1f} tok/s]",
        file=sys.stderr,
    )
    return 0


# ---- the command line -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgpt", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a byte-level GPT (default corpus: the stdlib)")
    t.add_argument("--data", help="a text file or a folder of them (default: the stdlib source)")
    t.add_argument("--out", default="out-fastgpt", help="checkpoint folder (default %(default)s)")
    t.add_argument("--max-steps", type=int, default=2000)
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step, per process")
    t.add_argument("--block-size", type=int, default=256)
    t.add_argument("--n-layer", type=int, default=4)
    t.add_argument("--n-head", type=int, default=4)
    t.add_argument("--n-embd", type=int, default=256)
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--eval-interval", type=int, default=250)
    t.add_argument("--eval-iters", type=int, default=20)
    t.add_argument("--log-interval", type=int, default=10)
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--backend", choices=("reference", "cpu", "triton"), help="force a backend")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    t.add_argument("--no-progress", action="store_true", help="plain prints instead of tqdm")

    s = sub.add_parser("sample", help="generate text from a checkpoint (KV cache)")
    s.add_argument("--ckpt", required=True, help="a `train` output folder, safetensors, or name")
    s.add_argument("--prompt", default="\n")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--tokenizer", help="tokenizer for a non-byte vocabulary (local only)")
    s.add_argument("--backend", choices=("reference", "cpu", "triton"))
    s.add_argument("--device")

    sub.add_parser("bench", help="kernel benchmarks (fastgpt.bench)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to fastgpt.bench
        try:
            from fastgpt import bench
        except ModuleNotFoundError as e:
            if e.name != "fastgpt.bench":
                raise
            raise SystemExit("fastgpt bench: this install has no fastgpt.bench module") from None
        return bench.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    return {"train": train, "sample": sample}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
