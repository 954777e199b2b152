#!/usr/bin/env python3
"""PyTorch's batch norm timed on the table of the Rust report (`cargo run --release`).

Times ``torch.nn.functional.batch_norm``:
  forward-train  training=True (batch statistics, running-stat update), no autograd;
  eval           training=False with running statistics;
  backward       autograd of the training forward w.r.t. input, weight and bias for
                 a given grad_output (``torch.autograd.grad`` on a retained graph:
                 the backward only, not the forward);
plus a plain copy (``dst.copy_(x)``) of the same tensor as the bandwidth yardstick,
on the CPU and on CUDA when available, in channels-first and channels-last layouts
(``torch.channels_last`` for 4-D, ``torch.channels_last_3d`` for 5-D; a 3-D (N, C, L)
tensor is made channels-last by permuting an (N, L, C) one; 2-D shapes have one
layout, ``cf=cl``).

Effective bandwidth uses the floor bytes of the Rust report (E elements, s = 4
bytes): forward-train 3Es, eval 2Es, backward 5Es, copy 2Es. Times are medians of
``--reps`` runs after warm-up; on CUDA they come from CUDA events around each run
(synchronised), on the CPU from ``time.perf_counter``. Inputs are rotated through
several copies (``--rotate-mib``) so that repeated runs do not just hit the caches.

Usage:
  python3 benches/torch_compare.py                 # the default table (ResNet-50 at batch 32)
  python3 benches/torch_compare.py --batch 8       # ResNet-50 shapes at batch 8
  python3 benches/torch_compare.py --shapes 32x64x112x112,256x1024 --reps 20 --device cuda
  # the Rust report, then torch on the same table, side by side:
  cargo run --release && python3 benches/torch_compare.py --rust-csv bench-results/results.csv

With ``--rust-csv PATH`` (the Rust report's results.csv) the shapes, layouts and ops
default to those of that report (unless --shapes/--batch/--quick is given), and after
the timings a second, side-by-side table joins both on (shape, layout, op): torch CPU
vs the Rust fast CPU path, and torch CUDA vs the Rust GPU when CUDA was timed
('-' where one side has no row).

Writes ``OUT/torch_results.csv`` (default OUT: bench-results/), and with --rust-csv
also ``OUT/side_by_side.csv``. Needs PyTorch (``pip install torch``); without it the
script says so and exits with status 2.
"""

import argparse
import csv
import math
import os
import statistics
import sys
import time

FLOOR_STREAMS = {"forward-train": 3, "eval": 2, "backward": 5, "copy": 2}
OP_NAMES = {"train": "forward-train", "eval": "eval", "backward": "backward"}
OP_ARGS = {name: arg for arg, name in OP_NAMES.items()}
SIDE_FIELDS = ["shape", "layout", "op", "torch_cpu_ms", "rust_cpu_ms", "rust_cpu_speedup",
               "torch_cuda_ms", "rust_gpu_ms", "torch_cuda_over_rust_gpu",
               "rust_gpu_over_copy", "torch_cuda_over_copy"]
ELEMENT_BYTES = 4
WARMUP = 3
DEFAULT_RESNET_BATCH = 32


def table(resnet_batch):
    """The Rust report's table: 2-D shapes, ResNet-50 at `resnet_batch`, tiny, 3-D."""
    shapes = [(256, 1024), (4096, 256)]
    shapes += [(resnet_batch, c, hw, hw) for c, hw in
               [(64, 112), (256, 56), (512, 28), (1024, 14), (2048, 7)]]
    shapes += [(8, 16, 8, 8), (2, 32, 16, 32, 32)]
    return shapes


def parse_shape(text):
    try:
        dims = tuple(int(d) for d in text.strip().replace("*", "x").lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r} (expected e.g. 32x64x112x112)")
    if not 2 <= len(dims) <= 5 or min(dims) <= 0:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: 2 to 5 non-zero dims")
    return dims


def comma_list(parse, allowed=None):
    def parse_list(text):
        items = [parse(t) for t in text.split(",") if t.strip()]
        if allowed is not None:
            bad = [t for t in items if t not in allowed]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {sorted(allowed)}")
        return items
    return parse_list


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time torch.nn.functional.batch_norm (forward-train, eval, backward) "
                    "on the table of the Rust bench report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Usage:")[1] if "Usage:" in __doc__ else None)
    p.add_argument("--shapes", type=comma_list(parse_shape),
                   help="comma-separated shapes NxC[xD][xH]xW (replaces the default table)")
    p.add_argument("--layouts", type=comma_list(str.strip, {"cf", "cl"}),
                   help="cf (channels-first) and/or cl (channels-last); "
                        "default cf,cl (with --rust-csv: those of the Rust report)")
    p.add_argument("--ops", type=comma_list(str.strip, set(OP_NAMES)),
                   help="train, eval, backward; default all (with --rust-csv: those of the Rust report)")
    p.add_argument("--reps", type=int, help="timed repetitions (default: by size, 5 to 50)")
    p.add_argument("--device", type=comma_list(str.strip, {"cpu", "cuda"}),
                   help="cpu and/or cuda (default: cpu, and cuda when available)")
    p.add_argument("--out", default="bench-results", help="output directory (default bench-results)")
    p.add_argument("--rotate-mib", type=int, default=256,
                   help="input copies span at least this many MiB (at most 8 copies; 0: one)")
    p.add_argument("--rust-csv", metavar="PATH",
                   help="the Rust report's results.csv: default the table to its shapes, layouts "
                        "and ops, and print and write (OUT/side_by_side.csv) a side-by-side table")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int,
                      help=f"batch of the ResNet-50 shapes of the default table (default {DEFAULT_RESNET_BATCH})")
    size.add_argument("--quick", action="store_true", help="only the tiny shape 8x16x8x8")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def default_reps(numel):
    if numel >= 4 << 20:
        return 5
    if numel >= 256 << 10:
        return 10
    if numel >= 16 << 10:
        return 20
    return 50


def label(dims):
    return "x".join(str(d) for d in dims)


def gbs(nbytes, ms):
    return nbytes / ms / 1e6 if ms and ms > 0 else float("nan")


class Timer:
    """Times `work(i)`: CUDA events on a CUDA device, perf_counter on the CPU."""

    def __init__(self, torch, device):
        self.torch = torch
        self.cuda = device.type == "cuda"

    def time(self, reps, work):
        torch = self.torch
        samples = []
        for i in range(WARMUP + reps):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                work(i)
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                work(i)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= WARMUP:
                samples.append(ms)
        return statistics.median(samples)


def make_input(torch, dims, layout, device, gen, scale):
    """A tensor of logical shape `dims` in the given memory layout."""
    x = (torch.rand(dims, generator=gen, dtype=torch.float32) * 2 - 1) * scale
    x = x.to(device)
    if layout == "cl":
        if len(dims) == 4:
            x = x.to(memory_format=torch.channels_last)
        elif len(dims) == 5:
            x = x.to(memory_format=torch.channels_last_3d)
        elif len(dims) == 3:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def measure_shape(torch, F, dims, layouts, ops, device, reps, rotate_bytes, progress):
    rows = []
    numel = math.prod(dims)
    nbytes = numel * ELEMENT_BYTES
    copies = max(1, min(8, -(-rotate_bytes // nbytes))) if rotate_bytes > 0 else 1
    c = dims[1]
    timer = Timer(torch, device)
    gen = torch.Generator().manual_seed(numel)
    weight = (torch.rand(c, generator=gen) + 0.5).to(device)
    bias = (torch.rand(c, generator=gen) - 0.5).to(device)
    running_mean = (torch.rand(c, generator=gen) - 0.5).to(device)
    running_var = (torch.rand(c, generator=gen) + 0.5).to(device)
    spatial = math.prod(dims[2:])
    wanted = layouts[:1] if spatial == 1 else layouts
    for layout in wanted:
        shown = "cf=cl" if spatial == 1 else layout
        xs = [make_input(torch, dims, layout, device, gen, 2.0) for _ in range(copies)]
        dys = [make_input(torch, dims, layout, device, gen, 1.0) for _ in range(copies)]
        dst = torch.empty_like(xs[0])
        copy_ms = timer.time(reps, lambda i: dst.copy_(xs[i % copies]))
        copy_gbs = gbs(FLOOR_STREAMS["copy"] * nbytes, copy_ms)
        progress(f"{device.type} {label(dims)} {shown} copy: {copy_ms:.3f} ms, {copy_gbs:.2f} GB/s")

        def train(i):
            F.batch_norm(xs[i % copies], running_mean, running_var, weight, bias,
                         training=True, momentum=0.1, eps=1e-5)

        def evaluate(i):
            F.batch_norm(xs[i % copies], running_mean, running_var, weight, bias,
                         training=False, momentum=0.1, eps=1e-5)

        graphs = []
        if "backward" in ops:
            w = weight.clone().requires_grad_(True)
            b = bias.clone().requires_grad_(True)
            for k in range(copies):
                x = xs[k].detach().clone().requires_grad_(True)
                y = F.batch_norm(x, running_mean.clone(), running_var.clone(), w, b,
                                 training=True, momentum=0.1, eps=1e-5)
                graphs.append((x, y))

        def backward(i):
            x, y = graphs[i % copies]
            torch.autograd.grad(y, (x, w, b), dys[i % copies], retain_graph=True)

        work = {"train": train, "eval": evaluate, "backward": backward}
        for op in ops:
            with torch.no_grad() if op != "backward" else torch.enable_grad():
                ms = timer.time(reps, work[op])
            name = OP_NAMES[op]
            eff = gbs(FLOOR_STREAMS[name] * nbytes, ms)
            row = {
                "device": device.type, "shape": label(dims), "layout": shown, "op": name,
                "numel": numel, "floor_bytes": FLOOR_STREAMS[name] * nbytes, "reps": reps,
                "input_copies": copies, "ms": ms, "gbs": eff, "copy_ms": copy_ms,
                "copy_gbs": copy_gbs, "over_copy": eff / copy_gbs,
            }
            rows.append(row)
            progress(f"{device.type} {label(dims)} {shown} {name}: {ms:.3f} ms, {eff:.2f} GB/s, "
                     f"{row['over_copy']:.2f}x copy")
        del graphs, xs, dys, dst
    return rows


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.4f}" if ms < 1 else f"{ms:.3f}"


def fmt_ratio(x):
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def print_grid(head, cells, groups, left):
    """Prints `cells` under `head`, columns `left` left-aligned, a blank line between groups."""
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(head)]

    def line(items):
        return "  ".join(s.ljust(w) if i in left else s.rjust(w)
                         for i, (s, w) in enumerate(zip(items, widths))).rstrip()

    print(line(head))
    print("-" * len(line(head)))
    last = None
    for group, c in zip(groups, cells):
        if last is not None and group != last:
            print()
        last = group
        print(line(c))


def print_table(rows):
    head = ["device", "shape", "layout", "op", "reps", "ms", "GB/s", "copy GB/s", "vs copy"]
    cells = [[r["device"], r["shape"], r["layout"], r["op"], str(r["reps"]), fmt_ms(r["ms"]),
              f"{r['gbs']:.2f}", f"{r['copy_gbs']:.2f}", f"{r['over_copy']:.2f}"] for r in rows]
    print_grid(head, cells, [(r["device"], r["shape"]) for r in rows], {0, 1, 2, 3})


def to_float(text):
    """A number from a CSV cell; None for an empty cell or NaN."""
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def read_rust_csv(path):
    """The Rust report's rows, keyed by (shape, layout, op), in file order."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"shape", "layout", "op", "cpu_ms", "gpu_ms", "gpu_over_copy"} - set(
            reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: not a Rust results.csv (missing columns {sorted(missing)})")
        rows = {(r["shape"], r["layout"], r["op"]): r for r in reader}
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def rust_table(rust):
    """The distinct shapes, layouts and ops (argument names) of the Rust report, in order."""
    shapes = [parse_shape(s) for s in dict.fromkeys(shape for shape, _, _ in rust)]
    layouts = [l for l in dict.fromkeys(layout for _, layout, _ in rust) if l in ("cf", "cl")]
    ops = [OP_ARGS[o] for o in dict.fromkeys(op for _, _, op in rust) if o in OP_ARGS]
    return shapes, layouts or ["cf"], ops


def ratio(a, b):
    return a / b if a is not None and b else None


def side_by_side(rows, rust):
    """Torch and Rust rows joined on (shape, layout, op): Rust's order, then torch-only keys."""
    torch_ms = {(r["device"], r["shape"], r["layout"], r["op"]): r for r in rows}
    keys = list(dict.fromkeys(list(rust) + [k[1:] for k in torch_ms]))
    joined = []
    for key in keys:
        cpu = torch_ms.get(("cpu",) + key, {})
        cuda = torch_ms.get(("cuda",) + key, {})
        r = rust.get(key, {})
        rust_cpu, rust_gpu = to_float(r.get("cpu_ms")), to_float(r.get("gpu_ms"))
        joined.append(dict(zip(SIDE_FIELDS, key + (
            cpu.get("ms"), rust_cpu, ratio(cpu.get("ms"), rust_cpu),
            cuda.get("ms"), rust_gpu, ratio(cuda.get("ms"), rust_gpu),
            to_float(r.get("gpu_over_copy")), cuda.get("over_copy")))))
    return joined


def print_side_by_side(joined, with_cuda):
    head = ["shape", "layout", "op", "torch cpu ms", "rust cpu ms", "rust cpu speed-up"]
    if with_cuda:
        head += ["torch cuda ms", "rust gpu ms", "cuda/rust gpu", "rust gpu/copy",
                 "torch cuda/copy"]
    cells = []
    for j in joined:
        c = [j["shape"], j["layout"], j["op"], fmt_ms(j["torch_cpu_ms"]),
             fmt_ms(j["rust_cpu_ms"]), fmt_ratio(j["rust_cpu_speedup"])]
        if with_cuda:
            c += [fmt_ms(j["torch_cuda_ms"]), fmt_ms(j["rust_gpu_ms"]),
                  fmt_ratio(j["torch_cuda_over_rust_gpu"]), fmt_ratio(j["rust_gpu_over_copy"]),
                  fmt_ratio(j["torch_cuda_over_copy"])]
        cells.append(c)
    print("side by side: speed-up = torch cpu ms / rust cpu ms"
          + (", cuda/rust gpu = torch cuda ms / rust gpu ms" if with_cuda else "")
          + " (above 1: Rust is faster)")
    print_grid(head, cells, [j["shape"] for j in joined], {0, 1, 2})


def write_csv(path, rows, fields):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    print(f"wrote {path}")


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"torch_compare.py needs PyTorch, which is not installed here ({e}).\n"
              "Install it (e.g. `pip install torch`) on the machine to compare, then rerun.",
              file=sys.stderr)
        return 2

    rust = None
    layouts, ops = args.layouts or ["cf", "cl"], args.ops or list(OP_NAMES)
    if args.rust_csv:
        try:
            rust = read_rust_csv(args.rust_csv)
        except (OSError, ValueError, argparse.ArgumentTypeError) as e:
            print(f"--rust-csv: {e}", file=sys.stderr)
            return 2
    if args.shapes:
        shapes = args.shapes
    elif args.quick:
        shapes = [(8, 16, 8, 8)]
    elif rust is not None and args.batch is None:
        shapes, rust_layouts, rust_ops = rust_table(rust)
        layouts, ops = args.layouts or rust_layouts, args.ops or rust_ops
    else:
        shapes = table(args.batch or DEFAULT_RESNET_BATCH)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        print("--device cuda asked for, but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    ops = list(dict.fromkeys(ops))

    print(f"torch   : {torch.__version__} (CPU threads: {torch.get_num_threads()})")
    for d in devices:
        if d == "cuda":
            print(f"cuda    : {torch.cuda.get_device_name()} (cuDNN {torch.backends.cudnn.version()}, "
                  f"CUDA {torch.version.cuda}); time from CUDA events, synchronised")
        else:
            print("cpu     : time.perf_counter around each call")
    if rust is not None:
        print(f"rust    : {args.rust_csv} ({len(rust)} rows)")
    print(f"method  : median of reps after {WARMUP} warm-up runs; floor bytes forward-train 3Es, "
          "eval 2Es, backward 5Es, copy 2Es (s = 4)\n")
    sys.stdout.flush()

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        for dims in shapes:
            reps = args.reps or default_reps(math.prod(dims))
            rows += measure_shape(torch, F, dims, layouts, ops, device, reps,
                                  args.rotate_mib << 20, progress)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print_table(rows)
    if rust is not None:
        joined = side_by_side(rows, rust)
        print()
        print_side_by_side(joined, any(r["device"] == "cuda" for r in rows))
    os.makedirs(args.out, exist_ok=True)
    print()
    write_csv(os.path.join(args.out, "torch_results.csv"), rows,
              list(rows[0].keys()) if rows else ["device"])
    if rust is not None:
        write_csv(os.path.join(args.out, "side_by_side.csv"), joined, SIDE_FIELDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
