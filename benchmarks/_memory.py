"""Peak memory of one call on CPU, where torch keeps no allocator statistics.

The call runs in a fresh Python process: its inputs are built, then the kernel's high-water mark
is reset (writing "5" to /proc/self/clear_refs sets VmHWM to the current RSS) and the call runs;
VmHWM - RSS before the call is the peak the call itself added. ``ru_maxrss`` would not do: it is
inherited across fork/exec, so a child reports its parent's peak. `test_method_sees_a_known_
allocation` in the benchmarks checks the method against a tensor of known size.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PRELUDE = """
import json, torch
def _status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
def _measure(fn):
    fn()  # warm up (lazy init, first-touch of code paths); its memory is released after
    import gc; gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status("VmRSS")
    fn()
    print(json.dumps({"peak_bytes": _status("VmHWM") - before}))
"""


def peak_bytes(setup: str, call: str, env: dict | None = None) -> int:
    """Bytes the statement ``call`` adds at its peak, after ``setup`` ran, in a fresh process."""
    code = _PRELUDE + setup + f"\ndef _fn():\n    {call}\n_measure(_fn)\n"
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
