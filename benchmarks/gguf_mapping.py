"""Where a reopened GGUF file's memory goes, mapped (llama.cpp's default) against read (what GGUFModule does): each
way in a fresh process of its own, the resident memory split into file-backed pages (the mapped file) and
anonymous memory (what llama.cpp allocates, its repacked weights included) after the torch import, after opening,
and after decoding 64 tokens; and the decode rate, so that reading instead of mapping is seen to cost no speed.

    python benchmarks/gguf_mapping.py <model.gguf> [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def resident() -> dict[str, int]:
    """This process's resident MiB: file-backed, anonymous, and the peak."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssFile", "RssAnon", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024
    return fields


def worker(path: str, mmap: bool) -> None:
    import torch

    stages = {"torch imported": resident()}
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=torch.get_num_threads(),
                n_threads_batch=torch.get_num_threads(), logits_all=True, use_mmap=mmap, verbose=False)
    stages["opened"] = resident()
    prompt = list(range(1000, 1032))
    llm.eval(prompt)
    rates = []
    for _ in range(3):
        llm.reset()
        llm.eval(prompt)
        started = time.perf_counter()
        for token in range(64):
            llm.eval([2000 + token])
        rates.append(64 / (time.perf_counter() - started))
    stages["decoded"] = resident()
    print(json.dumps({"stages": stages, "tokens_per_s": sorted(rates)[1]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=("mapped", "read"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.gguf, args.worker == "mapped")
        return
    from common import machine, table

    print(machine())
    found: dict[str, list[dict]] = {"mapped": [], "read": []}
    for round_ in range(args.rounds):
        for way in (("mapped", "read") if round_ % 2 == 0 else ("read", "mapped")):
            done = subprocess.run([sys.executable, __file__, args.gguf, "--worker", way], capture_output=True,
                                  text=True, check=True)
            found[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = []
    for way, runs in found.items():
        last = runs[-1]["stages"]
        rates = [r["tokens_per_s"] for r in runs]
        rows.append({"file": way, **{f"{stage}: file + anon MiB": f"{s['RssFile']} + {s['RssAnon']}"
                                     for stage, s in last.items()},
                     "peak MiB": last["decoded"]["VmHWM"], "decode tok/s (low-high)": f"{min(rates):.0f}-"
                     f"{max(rates):.0f}"})
    print(table(f"{Path(args.gguf).name} ({Path(args.gguf).stat().st_size / 2**20:.0f} MiB), each way in a fresh "
                f"process, {args.rounds} rounds in alternating order", rows))


if __name__ == "__main__":
    main()
