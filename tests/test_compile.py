"""A patched model with a fixed schedule traces into one graph: no per-forward mutable state, no graph
breaks. Per-image merging cannot, and says so when compiled."""

import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge


@pytest.mark.parametrize("options", [{}, {"mlp_share": 1.0}, {"method": "atc"},
                                     {"method": "dtem", "embed_dim": 16, "matching": "agglomerative"}])
def test_torch_compile_fullgraph_on_cpu(options):
    torch._dynamo.reset()
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=5).eval()
    tokenmerge.patch(model, r=3, **options)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), eager, atol=1e-4, rtol=1e-4)
        # a second input of the same shape reuses the graph and stays correct
        y = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(compiled(y), model(y), atol=1e-4, rtol=1e-4)


def test_compiling_per_image_merging_warns_and_stays_correct():
    # Per-image token counts come from the data: the graph breaks and recompiles, so the user
    # is told to compile a fixed schedule instead; eager use stays silent.
    torch._dynamo.reset()
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2,
                              num_classes=5).eval()
    tokenmerge.patch(model, method="atc", r=3, threshold=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager = model(x)
        assert not caught
        compiled = torch.compile(model)(x)
    assert any("fixed schedule" in str(w.message) and "best_fixed.json" in str(w.message) for w in caught)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
