#!/usr/bin/env python3
"""Times upstream's PyTorch generation loop and `narx bench` on the same settings, in one run.

    python3 benches/compare_upstream.py --nar PATH/TO/NAR [--batch 1 8] [--repeat 3]

PATH/TO/NAR is a checkout of the upstream repository (ThisisBillhe/NAR; its `NAR-images`
directory holds the code used). Both sides generate a NAR-B class-conditional image on a
16x16 grid with random weights, guidance 4.0, top-k 2000, temperature 1, in float32 on the
CPU with the same number of threads: upstream's eager `generate` (as `sample_c2i.py` calls
it, without torch.compile), and narx on ONNX Runtime CPU (and tract with --tract). Each
figure is the median and the best of --repeat timed runs after one warm-up run. The runs
alternate (upstream, then narx, then upstream again...), so that a machine slowing down or
speeding up for a while weighs on both sides alike.

PyTorch and tqdm are installed with pip if they are missing (PyTorch's CPU wheel from
download.pytorch.org, else PyPI). The narx binary is built with `cargo build --release` unless --narx names one.
Runs on a shared machine vary by 15% or more: compare figures from the same run only.
"""

import argparse
import contextlib
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


PIP = [sys.executable, "-m", "pip", "install", "--quiet"]


def ensure_torch():
    """PyTorch and what upstream's generation code imports besides it (tqdm)."""
    try:
        importlib.import_module("tqdm")
    except ImportError:
        subprocess.check_call(PIP + ["tqdm"])
    try:
        return importlib.import_module("torch")
    except ImportError:
        pass
    cpu_wheel = PIP + ["torch", "--index-url", "https://download.pytorch.org/whl/cpu"]
    if subprocess.call(cpu_wheel) != 0:
        subprocess.check_call(PIP + ["torch"])
    return importlib.import_module("torch")


def upstream(nar, batch, grid, threads, seed):
    """Upstream's loop, warmed up: a function that times one generation, in seconds."""
    torch = ensure_torch()
    images = os.path.join(os.path.abspath(nar), "NAR-images")
    if not os.path.isdir(os.path.join(images, "autoregressive")):
        sys.exit(f"{nar} does not look like the NAR repository (no NAR-images/autoregressive)")
    sys.path.insert(0, images)
    from autoregressive.models.gpt import GPT_models
    from autoregressive.models.generate import generate

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(seed)
    model = GPT_models["GPT-B"](
        vocab_size=16384, block_size=grid * grid, num_classes=1000, cls_token_num=1, model_type="c2i"
    ).to(dtype=torch.float32)
    # Random weights everywhere (upstream zeroes its output head at init, which would make
    # every logit equal and top-k keep the whole vocabulary); norm scales stay 1.
    for name, parameter in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.eval()
    labels = torch.tensor([(207 + 97 * i) % 1000 for i in range(batch)])

    def run():
        # Upstream's loop draws a tqdm progress bar on stderr; keep the report readable.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            started = time.perf_counter()
            generate(model, labels, grid * grid, cfg_scale=4.0, cfg_interval=-1,
                     temperature=1.0, top_k=2000, top_p=1.0, sample_logits=True)
            return time.perf_counter() - started

    run()  # warm-up
    return run


def matmul_gflops(threads):
    """ONNX Runtime's rate on a plain 4096^3 float32 MatMul (the machine's reference)."""
    for module, package in (("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        try:
            importlib.import_module(module)
        except ImportError:
            subprocess.check_call(PIP + [package])
    import numpy as np
    import onnx
    import onnx.helper as h
    import onnxruntime as ort

    n = 4096
    b = onnx.numpy_helper.from_array(np.random.rand(n, n).astype(np.float32), "b")
    graph = h.make_graph([h.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                         [h.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [n, n])],
                         [h.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [n, n])], [b])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    a = {"a": np.random.rand(n, n).astype(np.float32)}
    session.run(None, a)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        session.run(None, a)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def export(binary, grid, directory):
    """NAR-B with random weights, exported once for every narx run."""
    subprocess.run([binary, "export", "--preset", "nar-b", "--random-weights", "--grid",
                    str(grid), "-o", directory], check=True, capture_output=True)


def narx(binary, model, provider, batch, threads):
    """`narx bench --json`'s result object for one timed generation (after its warm-up)."""
    command = [binary, "bench", model, "--batch", str(batch), "--repeat", "1",
               "--threads", str(threads), "--provider", provider, "--cfg-scale", "4",
               "--top-k", "2000", "--json"]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nar", required=True, help="checkout of ThisisBillhe/NAR")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--grid", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--narx", help="narx binary (default: build target/release/narx)")
    parser.add_argument("--tract", action="store_true", help="also time narx on tract")
    parser.add_argument("--json", action="store_true", help="print one JSON object per figure")
    args = parser.parse_args()
    if min(args.batch) < 1 or args.repeat < 1 or args.threads < 1:
        sys.exit("--batch, --repeat and --threads must be at least 1")

    binary = args.narx
    if binary is None:
        subprocess.check_call(["cargo", "build", "--release", "--workspace", "--quiet"], cwd=ROOT)
        binary = os.path.join(ROOT, "target", "release", "narx")

    providers = ["cpu"] + (["tract"] if args.tract else [])
    matmul = matmul_gflops(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        model = os.path.join(temp, "nar-b")
        export(binary, args.grid, model)
        for batch in args.batch:
            run_upstream = upstream(args.nar, batch, args.grid, args.threads, args.seed)
            runs = {"upstream": []} | {provider: [] for provider in providers}
            for _ in range(args.repeat):
                runs["upstream"].append(run_upstream() / batch)
                for provider in providers:
                    runs[provider].append(narx(binary, model, provider, batch, args.threads))
            seconds = runs.pop("upstream")
            rows.append({"impl": "upstream pytorch (eager)", "batch": batch,
                         "seconds_per_image": statistics.median(seconds),
                         "best_seconds_per_image": min(seconds)})
            for results in runs.values():
                median = lambda key: statistics.median(r[key] for r in results)
                rows.append({"impl": f"narx {results[0]['provider']}", "batch": batch,
                             "seconds_per_image": median("seconds_per_image"),
                             "best_seconds_per_image": min(r["seconds_per_image"]
                                                           for r in results),
                             "gflops_per_s": median("gflops_per_s"),
                             "sampling_seconds": median("sampling_seconds")})
    if args.json:
        print(json.dumps({"impl": "onnxruntime 4096^3 matmul", "gflops_per_s": matmul}))
        for row in rows:
            print(json.dumps(row))
        return
    print(f"NAR-B, {args.grid}x{args.grid}, guidance 4.0, top-k 2000, float32, "
          f"{args.threads} threads; median (best) of {args.repeat} runs")
    print(f"  ONNX Runtime on a 4096^3 MatMul: {matmul:.1f} GFLOP/s")
    for batch in args.batch:
        base = next(r for r in rows if r["batch"] == batch and r["impl"].startswith("upstream"))
        for row in (r for r in rows if r["batch"] == batch):
            speedup = base["seconds_per_image"] / row["seconds_per_image"]
            rate = ""
            if "gflops_per_s" in row:
                rate = (f"  {row['gflops_per_s']:.0f} GFLOP/s "
                        f"({100 * row['gflops_per_s'] / matmul:.0f}% of the MatMul)")
            print(f"  batch {batch:2}  {row['impl']:28} {row['seconds_per_image']:7.3f} s/image "
                  f"({row['best_seconds_per_image']:.3f})  x{speedup:.2f}{rate}")


if __name__ == "__main__":
    main()
