"""How far merging moves a trained model's image embedding: cosine similarity between the
pre-logits embedding of the merged and of the unmodified model, per image.

    python benchmarks/embedding_drift.py --limit 500 --r 8 16

Uses the embedded ViT-Tiny Imagenette checkpoint (trained weights, unlike the random-weight
CLIP tower in benchmarks/hf_vit.py, which cannot be downloaded here) and the first
``--limit`` images of ../shared/data/imagenette/val taken evenly over the classes.
"""

import argparse
import copy
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.data import image_folder, image_loader
from tokenmerge.models import load_model

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette" / "val"
DTEM_MODULES = Path(tokenmerge.__file__).parent / "assets" / "dtem_vit_tiny_patch16_224.imagenette.r16.safetensors"


@torch.inference_mode()
def embeddings(model, images):
    """``[N, C]`` pre-logits embeddings (size-weighted pooling on a merged model)."""
    if not tokenmerge.is_patched(model):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    state = model.forward_tokens(images)
    return model.forward_head(state.x, pre_logits=True, token_sizes=state.size)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--val", default=str(VAL))
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--methods", nargs="+", default=["tome"])
    parser.add_argument("--dtem-modules", default=str(DTEM_MODULES), help="trained modules for method dtem")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dataset = image_folder(args.val, limit=args.limit, spread=True)
    images = torch.cat([x for x, _ in image_loader(dataset, batch_size=100)])
    base = load_model()
    reference = embeddings(base, images)
    print(f"{len(images)} images from {args.val}, embedded ViT-Tiny, pre-logits embedding (192-d)")
    print("method  r   cosine mean  min     p5")
    for method in args.methods:
        for r in args.r:
            merged = tokenmerge.patch(copy.deepcopy(base), method=method, r=r)
            if method == "dtem":
                tokenmerge.load_merge_modules(merged, args.dtem_modules)
            cosine = torch.nn.functional.cosine_similarity(embeddings(merged, images), reference, dim=-1)
            p5 = cosine.quantile(0.05).item()
            print(f"{method:6s}  {r:2d}  {cosine.mean().item():.4f}       {cosine.min().item():.4f}  {p5:.4f}")


if __name__ == "__main__":
    main()
