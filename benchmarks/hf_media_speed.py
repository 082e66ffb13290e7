"""Speed of token merging on video and audio: a VideoMAE-B- or AST-B-shaped classifier,
unmodified vs ToMe vs the token-drop bound (issue 12).

Not a test: run by hand, results go to BENCHMARKS.md section 12.

    python benchmarks/hf_media_speed.py --threads 1 --r 32 64 96 120 --json benchmarks/results/video/video_speed.json
    python benchmarks/hf_media_speed.py --model ast --threads 1 --r 25 50 75 100 --json benchmarks/results/audio/ast_speed.json
    python benchmarks/hf_media_speed.py --layers 6 --frames 8        # a smaller, quicker shape

Models with *random* weights (no network here, and speed does not depend on the weights),
hidden 768, 12 heads, MLP 3072, patch 16:

- ``videomae``: ``VideoMAEForVideoClassification`` at 224x224, tubelets of 2 frames, mean
  pooling, 400 classes. 16 frames give 8 x 14 x 14 = 1,568 tubelet tokens, all mergeable (no
  class token), merged across space and time. ``--layers``/``--frames`` shrink it.
- ``ast``: ``ASTForAudioClassification`` on a 10 s clip (1,024 frames x 128 mel bins), strides
  10 x 10: 12 x 101 = 1,212 overlapping spectrogram patches plus the class and distillation
  tokens (protected), 527 classes (AudioSet's). ``drop`` removes the same tokens as ToMe at no cost (no scoring,
no merging, no size bias): the speed no merge method can beat with that schedule.

All variants share one set of weights and are timed interleaved in one run, batch 1, by
:func:`tokenmerge.evaluation.throughput.measure_throughput` (median over repeats); report
speedups only as ratios from the same run. GFLOPs per clip are counted by
:func:`tokenmerge.evaluation.flops.count_gflops` (2 FLOPs per multiply-add).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.throughput import measure_throughput


def build_base(layers: int, frames: int, image_size: int):
    """A random-weight VideoMAE-B-shaped classifier (``layers`` blocks, ``frames`` frames) and a clip."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    config = VideoMAEConfig(
        hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
        image_size=image_size, patch_size=16, num_frames=frames, tubelet_size=2, num_labels=400,
        use_mean_pooling=True,
    )
    torch.manual_seed(0)
    model = VideoMAEForVideoClassification._from_config(config, attn_implementation="sdpa").eval()
    clip = torch.randn(1, frames, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return model, clip


def build_ast(layers: int, frames: int = 1024, mel_bins: int = 128):
    """A random-weight AST-B-shaped classifier and a ``[1, frames, mel_bins]`` spectrogram."""
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                       patch_size=16, frequency_stride=10, time_stride=10, max_length=frames,
                       num_mel_bins=mel_bins, num_labels=527)
    torch.manual_seed(0)
    model = ASTForAudioClassification._from_config(config, attn_implementation="sdpa").eval()
    return model, torch.randn(1, frames, mel_bins, generator=torch.Generator().manual_seed(0))


def variant(base, method=None, r=0):
    """A copy of ``base`` that shares its parameters and buffers (only the module objects are
    copied, so every variant's patch is its own but the weights exist once)."""
    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    model = copy.deepcopy(base, memo=shared)
    return model if method is None else tokenmerge.patch(model, method=method, r=r)


def tokens_out(model, num_tokens: int) -> int:
    trunk = getattr(model, "videomae", None) or model.audio_spectrogram_transformer
    return trunk.tokens_per_block()[-1] if tokenmerge.is_patched(model) else num_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, nargs="+", default=[32, 64, 96, 120],
                        help="tokens removed per block by ToMe and by the drop bound")
    parser.add_argument("--model", choices=("videomae", "ast"), default="videomae")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-gflops", action="store_true", help="skip the FLOP count (one extra forward per variant)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model == "videomae":
        base, video = build_base(args.layers, args.frames, args.image_size)
        grid = tokenmerge.adapter_for(base).video_grid()
        num_tokens = grid[0] * grid[1] * grid[2]
        shape = {"frames": args.frames, "image_size": args.image_size, "tubelet": 2, "grid_thw": list(grid)}
    else:
        base, video = build_ast(args.layers)
        num_tokens = tokenmerge.adapter_for(base).num_tokens
        shape = {"spectrogram": list(video.shape[1:]), "strides": [10, 10]}
    models = {"unmodified": variant(base)}
    for r in args.r:
        models[f"tome r={r}"] = variant(base, "tome", r)
        models[f"drop r={r}"] = variant(base, "drop", r)

    start = time.time()
    speed = measure_throughput(models, inputs=video, warmup=args.warmup, repeats=args.repeats)
    rows = []
    for name, model in models.items():
        row = {
            "variant": name,
            "tokens_out": tokens_out(model, num_tokens),
            "clips_per_s": speed[name]["images_per_s"],
            "ms_per_clip": speed[name]["ms_per_batch"],
            "speedup": speed[name]["images_per_s"] / speed["unmodified"]["images_per_s"],
            "times_s": speed[name]["times_s"],
        }
        if not args.no_gflops:
            row["gflops"] = count_gflops(model, images=video)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "times_s"}), flush=True)
    result = {
        "model": f"{type(base).__name__}, random weights (speed only)",
        "shape": {"hidden": 768, "heads": 12, "layers": args.layers, "patch": 16, "tokens": num_tokens, **shape},
        "batch": 1, "warmup": args.warmup, "repeats": args.repeats,
        "machine": f"{platform.machine()} CPU, {args.threads} thread(s), fp32",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_s": round(time.time() - start, 1),
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
