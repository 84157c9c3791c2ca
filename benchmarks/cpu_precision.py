"""Inference and training speed of a method in fp32 vs bf16 autocast, contiguous vs channels_last.

Measured side by side in one run (not part of the test suite). It is the evidence behind ``amp: auto``
meaning fp32 on a CPU and behind channels_last everywhere: bf16 autocast pays only where the CPU has AMX
tiles; with AVX-512 BF16 alone it ran slower than fp32 here, and without either PyTorch emulates it.

Usage::

    python benchmarks/cpu_precision.py                      # minmax_entropy / resnet18, 224 px, batch 16
    python benchmarks/cpu_precision.py --method cam --size 128 --batch 32 --train
"""

from __future__ import annotations

import argparse
import time


def cpu_bf16() -> str:
    """Which bf16 hardware this CPU has, as PyTorch sees it."""
    import torch

    has = [name for name, check in (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
           if bool(getattr(torch.cpu, check, lambda: False)())]
    return " + ".join(has) if has else "no native bf16 (emulated)"


def measure(args, x, y, dtype, channels_last: bool) -> tuple[float, float]:
    """(inference img/s, training img/s or NaN) of a freshly built model in one precision and memory format."""
    import torch

    from medwsol.engine.runtime import autocast
    from medwsol.methods.base import build_method

    cpu = torch.device("cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_method(args.method, num_classes=2, backbone=args.backbone).to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    model.eval()
    with torch.inference_mode():
        with autocast(cpu, dtype):
            model(x)  # warm-up
        t = time.perf_counter()
        for _ in range(args.iters):
            with autocast(cpu, dtype):
                out = model(x)
            out.weight_map.float().sum().item()
        infer = args.iters * args.batch / (time.perf_counter() - t)
    if not args.train:
        return infer, float("nan")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = max(1, args.iters // 2)
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            t = time.perf_counter()
        with autocast(cpu, dtype):
            loss = model.loss({"image": x, "label": y})["total"]
        opt.zero_grad()
        loss.float().backward()
        opt.step()
    return infer, steps * args.batch / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="minmax_entropy")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("--train", action="store_true", help="also time one training step (loss + backward + SGD)")
    args = p.parse_args(argv)

    import torch

    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 2, (args.batch,))
    rows = [("bf16" if dtype else "fp32", "channels_last" if cl else "contiguous", *measure(args, x, y, dtype, cl))
            for dtype in (None, torch.bfloat16) for cl in (False, True)]

    base_i, base_t = rows[0][2], rows[0][3]
    print(f"\n## {args.method}/{args.backbone}, {args.size}² px, batch {args.batch}, torch threads "
          f"{torch.get_num_threads()}; CPU: {cpu_bf16()}\n")
    print("| precision | memory format | inference img/s | × fp32 contiguous | train img/s | × fp32 contiguous |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for prec, fmt, i, t in rows:
        print(f"| {prec} | {fmt} | {i:.1f} | {i / base_i:.2f} | {t:.1f} | {t / base_t:.2f} |")


if __name__ == "__main__":
    main()
