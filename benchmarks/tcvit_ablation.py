"""TC-ViT ablation on the ViT-Tiny Imagenette checkpoint, off the shelf, at matched GFLOPs.

For each configuration (method + options) and each GFLOPs target (a fraction of the
unmodified model's), the reduction schedule is searched: the constant ``r`` whose GFLOPs
are closest to the target, or, when no constant ``r`` is within ``--tolerance``, the
closest two-level schedule (``r+1`` in the first ``j`` blocks, ``r`` after). GFLOPs are
counted with ``torch.utils.flop_counter`` on the patched model, so each method's own
scoring and matching matmuls are included (TC-ViT's connectivity passes cost FLOPs, and
that cost is paid by removing more tokens). Every configuration is then evaluated on
the full validation set, preloaded once.

Also measured: the added cost of TC-ViT's scoring in one block (GFLOPs and CPU time of
the relevance + fusion-target computation next to the block itself).

Results are appended to ``<out>.jsonl`` as they arrive and the markdown table is
rewritten after each configuration, so a long run can be polled.

Usage::

    python benchmarks/tcvit_ablation.py --threads 1 --out benchmarks/results/tcvit_ablation
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.core.relevance import dominance, select_and_fuse, token_relevance

CHECKPOINT = "/work/shared/models/vit_tiny_patch16_224.imagenette.safetensors"
VAL_DIR = "/work/shared/data/imagenette/val"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (group, label, method, options).
TCVIT_DEFAULT = dict(order=1, dominance_weight=0.5)
METHODS = [
    ("methods", "ToMe", "tome", {}),
    ("methods", "TC-ViT (K=1, w=0.5, fuse)", "tcvit", TCVIT_DEFAULT),
    ("methods", "prune (top by cls attn, no fusion)", "prune", {}),
    ("methods", "EViT (top by cls attn, rest fused into one)", "evit", {}),
    ("methods", "random (random reps, random targets)", "random", {"seed": 0}),
]
WEIGHT_ENDS = [
    ("dominance weight", "TC-ViT w=1 (dominance only, K=1)", "tcvit", dict(TCVIT_DEFAULT, dominance_weight=1.0)),
    ("dominance weight", "TC-ViT w=0 (connectivity only, K=1)", "tcvit", dict(TCVIT_DEFAULT, dominance_weight=0.0)),
]
FUSE_AND_ORDER = [
    ("fuse vs drop", "TC-ViT drop (K=1, w=0.5, fuse=False)", "tcvit", dict(TCVIT_DEFAULT, fuse=False)),
    ("order K", "TC-ViT K=2 (w=0.5)", "tcvit", dict(TCVIT_DEFAULT, order=2)),
    ("order K", "TC-ViT K=3 (w=0.5)", "tcvit", dict(TCVIT_DEFAULT, order=3)),
]
WEIGHT_MIDDLE = [
    ("dominance weight", "TC-ViT w=0.25 (K=1)", "tcvit", dict(TCVIT_DEFAULT, dominance_weight=0.25)),
    ("dominance weight", "TC-ViT w=0.75 (K=1)", "tcvit", dict(TCVIT_DEFAULT, dominance_weight=0.75)),
]
# Order K again at the token counts of K=1 (same schedule), i.e. ignoring the extra
# scoring FLOPs: isolates the quality of the higher-order score.
SAME_R = "order K, same r as K=1"
EQUAL_TOKENS = [
    (SAME_R, "TC-ViT K=2 (w=0.5), r of K=1", "tcvit", dict(TCVIT_DEFAULT, order=2)),
    (SAME_R, "TC-ViT K=3 (w=0.5), r of K=1", "tcvit", dict(TCVIT_DEFAULT, order=3)),
]
# Diagnostic: the same plans, but sizes are forgotten after each block, so there is no
# proportional attention (later merges are plain means of the current tokens). Tells
# whether fusing into a few large tokens hurts through the log-size bias.
UNTRACKED = "untracked_sizes"
NO_SIZES = [
    ("fusion without sizes", "TC-ViT (K=1, w=0.5, fuse), sizes untracked", "tcvit", dict(TCVIT_DEFAULT, **{UNTRACKED: True})),
    ("fusion without sizes", "EViT, sizes untracked", "evit", {UNTRACKED: True}),
]


# Run order as (index into --targets, configurations), most informative first: on a
# shared machine a cut-short run still answers the main questions. "baseline" evaluates
# the unmodified model.
RUN_ORDER = [
    (0, METHODS), (0, WEIGHT_ENDS), (0, FUSE_AND_ORDER),
    (0, NO_SIZES), (1, METHODS), "baseline", (1, WEIGHT_ENDS), (1, FUSE_AND_ORDER),
    (0, WEIGHT_MIDDLE), (0, EQUAL_TOKENS), (1, WEIGHT_MIDDLE), (1, EQUAL_TOKENS),
]
GROUP_ORDER = ["methods", "fuse vs drop", "fusion without sizes", "order K", SAME_R, "dominance weight"]


def patch(model, method, options, schedule):
    """``tokenmerge.patch`` for a configuration (the benchmark-only ``untracked_sizes`` flag
    makes the reducer drop sizes after each block)."""
    options = dict(options)
    if options.pop(UNTRACKED, False):
        method = tokenmerge.create_reducer(method, **options)
        method.tracks_size = False
        options = {}
    tokenmerge.patch(model, method=method, r=schedule, **options)


def load_model():
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    state = {k: v.float() for k, v in load_file(CHECKPOINT).items()}
    model.load_state_dict(state)
    return model.eval()


def load_val(root: str):
    """The whole val set as ``(images [N, 3, 224, 224] float32, labels [N])`` (no resize)."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    dataset = datasets.ImageFolder(root, transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, shuffle=False)
    images, labels = zip(*loader)
    return torch.cat(images), torch.cat(labels)


def gflops(model) -> float:
    try:
        from tokenmerge.evaluation.flops import count_gflops
    except ImportError:  # the lead's module is not there: the same count, inline
        return _count_gflops_inline(model)
    return count_gflops(model, image_size=224)


def _count_gflops_inline(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
        b, h, n_q, d = q_shape
        return 4 * b * h * n_q * k_shape[2] * d

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def patched_gflops(model, method, options, schedule) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clamped schedules are reported as effective ones
        patch(model, method, options, schedule)
    try:
        return gflops(model)
    finally:
        tokenmerge.unpatch(model)


def match_schedule(model, method, options, target_gflops, tolerance, num_blocks):
    """The schedule whose GFLOPs are closest to ``target_gflops`` (see the module docstring).

    Returns ``(schedule, gflops)``.
    """
    by_r = {}
    for r in range(1, 64):
        by_r[r] = patched_gflops(model, method, options, r)
        if by_r[r] < target_gflops * (1 - 2 * tolerance):
            break
        if r > 1 and by_r[r] >= by_r[r - 1]:  # the schedule is clamped: no further reduction
            break
    best_r = min(by_r, key=lambda r: abs(by_r[r] - target_gflops))
    if abs(by_r[best_r] / target_gflops - 1) <= tolerance:
        return best_r, by_r[best_r]
    low = max(r for r in by_r if by_r[r] >= target_gflops) if any(v >= target_gflops for v in by_r.values()) else 1
    candidates = {}
    for j in range(1, num_blocks):
        schedule = [low + 1] * j + [low] * (num_blocks - j)
        candidates[tuple(schedule)] = patched_gflops(model, method, options, schedule)
    best = min(candidates, key=lambda s: abs(candidates[s] - target_gflops))
    if abs(candidates[best] - target_gflops) < abs(by_r[best_r] - target_gflops):
        return list(best), candidates[best]
    return best_r, by_r[best_r]


@torch.inference_mode()
def evaluate(model, images, labels, batch_size):
    start = time.perf_counter()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size]).sum().item()
    return 100.0 * correct / len(images), time.perf_counter() - start


def _median_time(fn, repeats=7, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    def sdpa(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs):
        b, h, n_q, d = q_shape
        return 4 * b * h * n_q * k_shape[2] * d

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@torch.inference_mode()
def scoring_cost(model, images, batch_size=64, r=12):
    """Block 0 (197 tokens): the block's own cost vs TC-ViT's scoring in that block."""
    from tokenmerge.backends.timm import timm_attention
    from tokenmerge.core.attention import key_metric
    from tokenmerge.core.matching import bipartite_soft_matching

    x = model.norm_pre(model._pos_embed(model.patch_embed(images[:batch_size])))
    batch_size = x.shape[0]
    block = model.blocks[0]
    _, attn = timm_attention(block.attn, block.norm1(x), None, "auto")
    q, k, scale = attn.q, attn.k, attn.scale
    num_protected = 1

    def tcvit(order, weight, fuse=True):
        def run():
            rel = token_relevance(q, k, None, scale, num_protected, order, weight)
            return select_and_fuse(rel, q, k, None, scale, r, num_protected, fuse=fuse)
        return run

    cases = [
        ("the block itself (attention + MLP)", lambda: block(x)),
        ("ToMe matching (r=12)", lambda: bipartite_soft_matching(key_metric(k), r, num_protected)),
        ("dominance only (class row)", lambda: dominance(q, k, None, scale)),
        ("TC-ViT w=1, drop (class row + sort)", tcvit(1, 1.0, fuse=False)),
        ("TC-ViT K=1, w=0.5, fuse (r=12)", tcvit(1, 0.5)),
        ("TC-ViT K=2, w=0.5, fuse (r=12)", tcvit(2, 0.5)),
        ("TC-ViT K=3, w=0.5, fuse (r=12)", tcvit(3, 0.5)),
    ]
    rows = []
    for label, fn in cases:
        rows.append(
            dict(
                label=label,
                gflops_per_image=_flops_of(fn) / batch_size / 1e9,
                ms_per_batch=1e3 * _median_time(fn),
            )
        )
    return dict(batch_size=batch_size, tokens=x.shape[1], rows=rows)


def _schedule_label(schedule) -> str:
    if isinstance(schedule, list):
        high, low = schedule[0], schedule[-1]
        return f"r={high} x{schedule.count(high)}, r={low} x{schedule.count(low)}"
    return f"r={schedule}"


def write_markdown(path: Path, meta: dict, baseline: dict, results: list, cost: dict | None):
    lines = [
        "# TC-ViT ablation: ViT-Tiny on Imagenette, off the shelf, matched GFLOPs",
        "",
        f"- Command: `{meta['command']}`",
        f"- Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} thread(s)",
        f"- Started: {meta['started']}" + (f"; finished: {meta['finished']}" if meta.get("finished") else " (running)"),
        f"- Model: `vit_tiny_patch16_224` (`{CHECKPOINT}`, cast to fp32); data: full `{VAL_DIR}` "
        f"({meta['num_images']} images, ToTensor + ImageNet normalisation, no resize).",
        "- GFLOPs: `torch.utils.flop_counter` per image (2 FLOPs per multiply-add; matmuls and "
        "attention, so each method's own scoring/matching matmuls count). Each configuration's "
        "schedule is the constant r whose GFLOPs are closest to the target (within "
        f"{100 * meta['tolerance']:.0f}%), else a two-level schedule. TC-ViT default: K=1, "
        "w=0.5 (w = dominance weight), fuse=True. Time: wall seconds for the full val set at "
        f"batch {meta['batch_size']} on a shared machine (indicative only).",
        "",
    ]
    base_acc = baseline.get("accuracy")
    if base_acc is not None:
        lines += [
            f"Unmodified: **{base_acc:.2f}%** top-1, {baseline['gflops']:.3f} GFLOPs, "
            f"{baseline['seconds']:.0f} s.",
            "",
        ]
    for target in meta["targets"]:
        rows = [res for res in results if res["target"] == target]
        rows.sort(key=lambda res: GROUP_ORDER.index(res["group"]))  # stable: run order within a group
        if not rows:
            continue
        lines += [
            f"## Target {target:.2f}x GFLOPs ({100 * (target - 1):+.0f}%)",
            "",
            "| group | configuration | schedule | effective tokens (last block) | GFLOPs | vs unmodified | top-1 (%) | Δ top-1 | time (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for res in rows:
            lines.append(
                f"| {res['group']} | {res['label']} | {_schedule_label(res['schedule'])} | "
                f"{res['final_tokens']} | {res['gflops']:.3f} | {100 * (res['gflops'] / baseline['gflops'] - 1):+.1f}% | "
                f"{res['accuracy']:.2f} | "
                + (f"{res['accuracy'] - base_acc:+.2f}" if base_acc is not None else "n/a")
                + f" | {res['seconds']:.0f} |"
            )
        lines.append("")
    if cost:
        block = cost["rows"][0]
        lines += [
            f"## Added cost of scoring in one block (block 0, {cost['tokens']} tokens, batch {cost['batch_size']}, CPU, "
            f"{meta['threads']} thread(s))",
            "",
            "| computation | GFLOPs / image | vs block | ms / batch | vs block |",
            "|---|---|---|---|---|",
        ]
        for row in cost["rows"]:
            lines.append(
                f"| {row['label']} | {row['gflops_per_image']:.4f} | "
                f"{100 * row['gflops_per_image'] / block['gflops_per_image']:.1f}% | {row['ms_per_batch']:.1f} | "
                f"{100 * row['ms_per_batch'] / block['ms_per_batch']:.1f}% |"
            )
        lines.append("")
    path.write_text("\n".join(lines) + meta.get("appendix", ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.65, 0.50])
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--limit", type=int, default=None, help="first N val images (smoke runs only)")
    parser.add_argument("--out", default="benchmarks/results/tcvit_ablation")
    parser.add_argument("--resume", action="store_true", help="skip what <out>.jsonl already holds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")

    model = load_model()
    images, labels = load_val(VAL_DIR)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    meta = dict(
        command="python " + " ".join(sys.argv),
        machine="2-core CPU, fp32",
        torch=torch.__version__,
        platform=platform.platform(),
        threads=args.threads,
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        num_images=len(images),
        tolerance=args.tolerance,
        targets=args.targets,
        batch_size=args.batch_size,
    )

    def record(entry):
        with jsonl.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")

    done = {}
    baseline, cost = dict(gflops=gflops(model)), None
    if args.resume and jsonl.exists():
        for line in jsonl.read_text().splitlines():
            entry = json.loads(line)
            if entry["kind"] == "config":
                done[(entry["target"], entry["label"])] = entry
            elif entry["kind"] == "baseline":
                baseline = {k: v for k, v in entry.items() if k != "kind"}
            elif entry["kind"] == "scoring_cost":
                cost = {k: v for k, v in entry.items() if k != "kind"}
    else:
        jsonl.write_text("")
    results = list(done.values())
    if cost is None:
        cost = scoring_cost(model, images)
        record(dict(kind="scoring_cost", **cost))
        print("scoring cost measured", flush=True)
    write_markdown(out.with_suffix(".md"), meta, baseline, results, cost)

    num_blocks = len(model.blocks)
    k1_schedules = {
        res["target"]: res["schedule"]
        for res in results if res["method"] == "tcvit" and res["options"] == TCVIT_DEFAULT
    }
    for step in RUN_ORDER:
        if step == "baseline":
            if "accuracy" not in baseline:
                accuracy, seconds = evaluate(model, images, labels, args.batch_size)
                baseline.update(accuracy=accuracy, seconds=seconds)
                record(dict(kind="baseline", **baseline))
                write_markdown(out.with_suffix(".md"), meta, baseline, results, cost)
                print(f"unmodified {accuracy:.2f}% {baseline['gflops']:.3f} GFLOPs {seconds:.0f}s", flush=True)
            continue
        target_index, configs = step
        if target_index >= len(args.targets):
            continue
        target = args.targets[target_index]
        target_gflops = target * baseline["gflops"]
        for group, label, method, options in configs:
            if (target, label) in done:
                continue
            if group == SAME_R:
                schedule = k1_schedules[target]
                flops = patched_gflops(model, method, options, schedule)
            else:
                schedule, flops = match_schedule(model, method, options, target_gflops, args.tolerance, num_blocks)
            if method == "tcvit" and options == TCVIT_DEFAULT:
                k1_schedules[target] = schedule
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                patch(model, method, options, schedule)
            final_tokens = model.tokens_per_block()[-1]
            accuracy, seconds = evaluate(model, images, labels, args.batch_size)
            tokenmerge.unpatch(model)
            entry = dict(
                kind="config", target=target, group=group, label=label, method=method,
                options=options, schedule=schedule, final_tokens=final_tokens, gflops=flops,
                accuracy=accuracy, seconds=seconds,
            )
            results.append(entry)
            record(entry)
            write_markdown(out.with_suffix(".md"), meta, baseline, results, cost)
            print(f"{target:.2f} {label}: {_schedule_label(schedule)} {flops:.3f} GFLOPs "
                  f"{accuracy:.2f}% {seconds:.0f}s", flush=True)

    meta["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    write_markdown(out.with_suffix(".md"), meta, baseline, results, cost)
    print("done", flush=True)


if __name__ == "__main__":
    main()
