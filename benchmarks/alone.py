"""Time one saved model alone, in this (fresh) process, as a user deploys it: the yardstick the report's
ratios are checked against.

    python benchmarks/alone.py MODEL --test-script eval.py --test-dataset data/ [--calls 300] [--seconds 30] [--compile]

Prints ``median_ms = X`` and ``p10_ms``/``p90_ms``; the example input is the test script's example_input().
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--test-script", required=True)
    parser.add_argument("--test-dataset", required=True)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=30.0, help="stop earlier once this long (20 calls at least)")
    parser.add_argument("--compile", action="store_true", help="run it under torch.compile with freezing")
    args = parser.parse_args()

    import model_opt
    import torch
    from model_opt.measure import call_model, compile_model
    from model_opt.testscript import TestScript

    script = TestScript(args.test_script)
    model = model_opt.load(args.model, test_script=args.test_script)
    example = script.call("example_input", args.test_dataset)
    if args.compile:
        model = compile_model(model, example)[0]
    times = []
    with torch.inference_mode():
        for _ in range(10):
            call_model(model, example)
        begun = time.perf_counter()
        while len(times) < args.calls and (len(times) < 20 or time.perf_counter() - begun < args.seconds):
            started = time.perf_counter()
            call_model(model, example)
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    print(f"median_ms = {statistics.median(times):.4f}")
    print(f"p10_ms = {times[len(times) // 10]:.4f}")
    print(f"p90_ms = {times[len(times) * 9 // 10]:.4f}")


if __name__ == "__main__":
    main()
