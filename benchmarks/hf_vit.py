"""Hugging Face ViT-B/16 throughput/GFLOPs with ToMe, and CLIP image-embedding drift.

Not a test: run by hand, results go to benchmarks/results/hf.md.

    python benchmarks/hf_vit.py throughput --r 13 --batch 16 --repeats 5
    python benchmarks/hf_vit.py clip --images 200 --rs 8 16

``throughput``: ``ViTForImageClassification(ViTConfig())`` (ViT-B/16 at 224, random weights)
unpatched vs ``tokenmerge.patch(method="tome", r=...)``; the two are timed interleaved in one
run (plain, merged, plain, merged, ...) after warm-up, and the median per model is reported.
GFLOPs per image come from ``tokenmerge.evaluation.flops.count_gflops``.

``clip``: timm ``vit_base_patch16_clip_224`` image tower with *random* weights (no network
here), cosine similarity between the merged and unmerged image embeddings on Imagenette val
images normalised with CLIP's mean/std. With random weights this measures what merging does
to an untrained tower only, not to a trained CLIP.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.flops import count_gflops

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENETTE_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "val"


def _time_once(model, images) -> float:
    start = time.perf_counter()
    model(images)
    return time.perf_counter() - start


@torch.inference_mode()
def throughput(r: int, batch: int, repeats: int, warmup: int) -> None:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    plain = ViTForImageClassification(ViTConfig()).eval()
    merged = tokenmerge.patch(copy.deepcopy(plain), method="tome", r=r)
    images = torch.randn(batch, 3, 224, 224)
    models = {"unpatched": plain, f"tome r={r}": merged}
    for _ in range(warmup):
        for model in models.values():
            model(images)
    times = {name: [] for name in models}
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        for name, model in models.items():
            times[name].append(_time_once(model, images))
    print(f"attn_implementation={plain.config._attn_implementation}  batch={batch}  threads={torch.get_num_threads()}")
    print(f"tokens per block (r={r}): {merged.vit.tokens_per_block()}")
    print("| model | GFLOPs/img | im/s (median) | timings (s) |")
    print("|---|---|---|---|")
    base = None
    for name, model in models.items():
        gflops = count_gflops(model, image_size=224, batch_size=1)
        ims = batch / statistics.median(times[name])
        base = base or ims
        timings = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"| {name} | {gflops:.2f} | {ims:.2f} ({ims / base:.2f}x) | {timings} |")


@torch.inference_mode()
def clip_similarity(num_images: int, rs: list, batch: int) -> None:
    import timm
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    plain = timm.create_model("vit_base_patch16_clip_224", pretrained=False).eval()
    merged = {r: tokenmerge.patch(copy.deepcopy(plain), method="tome", r=r) for r in rs}
    transform = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    dataset = datasets.ImageFolder(str(IMAGENETTE_VAL), transform=transform)
    # An even spread over the classes (ImageFolder sorts by class).
    step = max(1, len(dataset) // num_images)
    subset = torch.utils.data.Subset(dataset, list(range(0, len(dataset), step))[:num_images])
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=0)
    sims = {r: [] for r in rs}
    for images, _ in loader:
        reference = plain(images)
        for r, model in merged.items():
            sims[r].append(torch.nn.functional.cosine_similarity(model(images), reference, dim=-1))
    print(f"vit_base_patch16_clip_224, RANDOM weights, embedding dim {reference.shape[-1]}, "
          f"{len(subset)} Imagenette val images")
    print("| r | tokens per block | cosine mean | cosine min | cosine p5 |")
    print("|---|---|---|---|---|")
    for r in rs:
        values = torch.cat(sims[r])
        counts = merged[r].tokens_per_block()
        print(f"| {r} | {counts[0]} -> {counts[-1]} | {values.mean():.4f} | {values.min():.4f} | "
              f"{values.quantile(0.05):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["throughput", "clip"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rs", type=int, nargs="+", default=[8, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "throughput":
        throughput(args.r, args.batch, args.repeats, args.warmup)
    else:
        clip_similarity(args.images, args.rs, batch=20)


if __name__ == "__main__":
    main()
