"""Time proportional attention: no bias vs the float-mask bias vs the bias folded into the keys.

    python benchmarks/attention_impls.py                 # CPU, fp32, ViT-S shapes, batch 16
    python benchmarks/attention_impls.py --device cuda --dtype bf16 --batch 256 --heads 12

Prints the median time per call in milliseconds for each token count. tokenmerge's
``attention_impl="auto"`` picks from these measurements: "bias" on CPU, "fold" on CUDA.
"""

import argparse
import statistics
import time

import torch

from tokenmerge.core.attention import proportional_attention


def median_ms(fn, device, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"{args.device} {args.dtype} B={args.batch} H={args.heads} D={args.head_dim} "
          f"threads={torch.get_num_threads()}: median ms per call")
    print("tokens  no-bias  bias  fold")
    with torch.inference_mode():
        for tokens in (197, 145, 93, 41):
            q, k, v = (torch.randn(args.batch, args.heads, tokens, args.head_dim, device=args.device,
                                   dtype=dtype) for _ in range(3))
            log_size = torch.rand(args.batch, tokens, device=args.device)
            row = [
                median_ms(lambda: proportional_attention(q, k, v, None), args.device),
                median_ms(lambda: proportional_attention(q, k, v, log_size, impl="bias"), args.device),
                median_ms(lambda: proportional_attention(q, k, v, log_size, impl="fold"), args.device),
            ]
            print(f"{tokens:6d}  " + "  ".join(f"{value:7.2f}" for value in row))


if __name__ == "__main__":
    main()
