"""Dense outputs (unmerging onto the patch grid) and the tomesd-style local layout."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge.backends import transformers as hf
from tokenmerge.dense import unmerge_to_grid

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

VISION = dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=3, num_attention_heads=3)


pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_vit():
    torch.manual_seed(0)
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=3, num_classes=5).eval()


def _hf_vit():
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(transformers.ViTConfig(**VISION, intermediate_size=96)).eval()


def _hf_dinov2_registers():
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(**VISION, mlp_ratio=2, num_register_tokens=2)
    return transformers.Dinov2WithRegistersModel(config).eval()


def _images(batch=2):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(3))


def _patch_tokens(model, x):
    """The unmodified model's final patch tokens ``[B, 16, C]``."""
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return model.forward_features(x)[:, model.num_prefix_tokens:]
    trunk = hf.vision_trunk(model)
    return trunk(x).last_hidden_state[:, hf.prefix_tokens(model):]


def _token_owner(model):
    """The module with ``forward_tokens``: a timm model itself, an HF model's vision trunk."""
    if isinstance(model, timm.models.vision_transformer.VisionTransformer):
        return model
    return hf.vision_trunk(model)


BUILDERS = {"timm_vit": _timm_vit, "hf_vit": _hf_vit, "hf_dinov2_registers": _hf_dinov2_registers}


def test_unmerge_to_grid_by_hand():
    # 1 protected token, 4 patches on a 2x2 grid merged into tokens 1 and 2; patch 3 discarded.
    x = torch.tensor([[[9.0], [1.0], [2.0]]])
    source = torch.tensor([[1, 2, 1, 3]])
    dense = unmerge_to_grid(x, source, num_protected=1, num_prefix=1, grid=(2, 2))
    assert dense.tolist() == [[[1.0], [2.0], [1.0], [0.0]]]
    grid = unmerge_to_grid(x, source, 1, 1, (2, 2), output="map", fill=torch.tensor([-1.0]))
    assert grid.shape == (1, 1, 2, 2) and grid.tolist() == [[[[1.0, 2.0], [1.0, -1.0]]]]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_dense_is_exact_when_nothing_is_merged(name):
    model = BUILDERS[name]()
    x = _images()
    with torch.no_grad():
        reference = _patch_tokens(model, x)
        unpatched = tokenmerge.dense_features(model, x)
        tokenmerge.patch(model, method="tome", r=0, trace_source=True)
        patched = tokenmerge.dense_features(model, x)
        as_map = tokenmerge.dense_features(model, x, output="map")
    assert torch.equal(unpatched, reference)
    assert torch.equal(patched, reference)
    assert torch.equal(as_map, reference.transpose(1, 2).reshape(2, 48, 4, 4))


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("method", ["tome", "drop"])
def test_dense_restores_the_grid_from_merged_tokens(name, method):
    model = tokenmerge.patch(BUILDERS[name](), method=method, r=3, trace_source=True)
    x = _images()
    with torch.no_grad():
        dense = tokenmerge.dense_features(model, x)
        as_map = tokenmerge.dense_features(model, x, output="map")
        state = _token_owner(model).forward_tokens(x)
    merged_count = state.x.shape[1]
    assert merged_count < 16  # tokens really were merged
    assert dense.shape == (2, 16, 48) and as_map.shape == (2, 48, 4, 4)
    assert torch.equal(as_map.flatten(2).transpose(1, 2), dense)
    # Every patch carries exactly the final token that absorbed it (zeros where discarded).
    for b in range(2):
        for p in range(16):
            token = int(state.source[b, p])
            expected = state.x[b, token] if token < merged_count else torch.zeros(48)
            assert torch.equal(dense[b, p], expected)
    if method == "tome":
        # Averaging the grid is the size-weighted mean of the merged patch tokens.
        first = _token_owner(model).tokenmerge_config.num_protected
        sizes = state.size[:, first:]
        weighted = (state.x[:, first:] * sizes).sum(1) / sizes.sum(1)
        torch.testing.assert_close(dense.mean(1), weighted, rtol=1e-5, atol=1e-6)


def test_dense_needs_sources_once_merged():
    model = tokenmerge.patch(_hf_vit(), method="tome", r=3)
    with pytest.raises(ValueError, match="trace_source=True"):
        tokenmerge.dense_features(model, _images())
    with pytest.raises(ValueError, match="output must be"):
        tokenmerge.dense_features(model, _images(), output="grid")


def test_dense_rejects_unsupported_models():
    with pytest.raises(TypeError, match="Linear"):
        tokenmerge.dense_features(torch.nn.Linear(3, 3), _images())


# -- the local (tomesd) layout ---------------------------------------------------------------


@pytest.mark.parametrize("make", [_hf_vit, _timm_vit], ids=["hf", "timm"])
def test_local_layout_r0_is_identical(make):
    model = make()
    x = _images()
    with torch.no_grad():
        reference = _logits(model, x)
        tokenmerge.patch(model, method="tome", r=0, layout="local")
        assert torch.equal(_logits(model, x), reference)


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("method", ["tome", "drop"])
def test_timm_local_layout_keeps_every_token(method):
    model = _timm_vit()
    x = _images()
    with torch.no_grad():
        reference = model.forward_features(x)
        tokenmerge.patch(model, method=method, r=6, layout="local")
        out = model.forward_features(x)
        dense = tokenmerge.dense_features(model, x)
    assert model.tokens_per_block() == [17] * 4
    assert model.tokenmerge_schedule() == (6, 6, 6)
    assert out.shape == reference.shape
    assert not torch.allclose(out, reference, atol=1e-4)
    assert torch.equal(dense, out[:, 1:])


@pytest.mark.parametrize("method", ["tome", "drop"])
def test_local_layout_keeps_every_token(method):
    model = _hf_dinov2_registers()
    x = _images()
    with torch.no_grad():
        reference = model(x).last_hidden_state
        tokenmerge.patch(model, method=method, r=6, layout="local")
        out = model(x, output_hidden_states=True)
        dense = tokenmerge.dense_features(model, x)
    assert model.tokens_per_block() == [19] * 4
    assert model.tokenmerge_schedule() == (6, 6, 6)  # every block merges from all 16 patches
    assert [h.shape[1] for h in out.hidden_states] == [19] * 4
    assert out.last_hidden_state.shape == reference.shape
    assert not torch.allclose(out.last_hidden_state, reference, atol=1e-4)  # merging is on
    assert torch.equal(dense, out.last_hidden_state[:, 3:])


def test_local_layout_is_exact_on_duplicate_tokens():
    # Identical patch tokens: merge-then-unmerge with proportional attention changes nothing.
    model = _hf_vit()
    with torch.no_grad():
        model.vit.embeddings.position_embeddings.zero_()
        x = torch.full((1, 3, 64, 64), -0.2)
        reference = model.vit(x).last_hidden_state
        tokenmerge.patch(model, method="tome", r=8, layout="local")
        local = model.vit(x).last_hidden_state
    assert local.shape == reference.shape
    torch.testing.assert_close(local, reference, rtol=1e-4, atol=1e-5)


def test_timm_local_layout_is_exact_on_duplicate_tokens():
    model = _timm_vit()
    with torch.no_grad():
        model.pos_embed.zero_()
        x = torch.full((1, 3, 64, 64), -0.2)
        reference = model.forward_features(x)
        tokenmerge.patch(model, method="tome", r=8, layout="local")
        torch.testing.assert_close(model.forward_features(x), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make,trunk", [(_hf_vit, hf.vision_trunk), (_timm_vit, lambda m: m)], ids=["hf", "timm"])
def test_local_layout_clamps_per_block(make, trunk):
    model = make()
    with pytest.warns(UserWarning, match="effective local schedule"):
        tokenmerge.patch(model, method="tome", r=12, layout="local")
    assert trunk(model).tokenmerge_schedule() == (8, 8, 8)
    with pytest.raises(ValueError, match="layout must be"):
        tokenmerge.patch(make(), method="tome", r=2, layout="tiled")


def test_dense_features_of_a_hugging_face_folder(hf_vit_dir):
    from tokenmerge.models import load_model

    model = load_model(f"hf:{hf_vit_dir}")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model.vit(x).last_hidden_state[:, 1:]
        assert torch.equal(tokenmerge.dense_features(model, x), reference)
        tokenmerge.patch(model, "tome", r=0, trace_source=True)
        assert torch.equal(tokenmerge.dense_features(model, x, output="map"),
                           reference.transpose(1, 2).reshape(2, 32, 4, 4))
        tokenmerge.patch(model, "tome", r=3, trace_source=True)
        dense = tokenmerge.dense_features(model, x)
    assert dense.shape == (2, 16, 32)
    for features in dense:  # per image, 16 patches share the 10 merged patch tokens
        assert features.unique(dim=0).shape[0] == 17 - 2 * 3 - 1


def _open_clip_tower(**kwargs):
    VisionTransformer = pytest.importorskip("open_clip.transformer").VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=2, output_dim=16,
                             **kwargs).eval()


@pytest.mark.parametrize("make, where", [
    (lambda: _open_clip_tower(patch_dropout=0.5), "patch_dropout"),
    (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=2, num_classes=5, patch_drop_rate=0.5),
     "patch_drop"),
], ids=["open_clip", "timm"])
@pytest.mark.parametrize("patched", [False, True])
def test_patch_dropout_in_train_mode_is_refused(make, where, patched):
    model = make().train()
    if patched:
        tokenmerge.patch(model, "tome", r=2, trace_source=True)
    with pytest.raises(ValueError, match=rf"{where} drops patches at random in train mode \(prob=0.5\).*"
                                         r"call model.eval\(\) first"):
        tokenmerge.dense_features(model, _images())
    assert tokenmerge.dense_features(model.eval(), _images(), output="map").shape[-2:] == (4, 4)
