"""DTEM: merge embeddings on a small random ViT, soft vs hard, module files."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.attention import key_metric
from tokenmerge.methods.dtem import DTEM, read_merge_module_metadata


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(embed_dim=32, depth=3, global_pool="token"):
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=4, embed_dim=embed_dim, depth=depth, num_heads=2,
                             num_classes=4, global_pool=global_pool).eval()


def test_gradients_reach_every_embedding_with_a_frozen_vit():
    model = tiny_vit(global_pool="avg")
    for p in model.parameters():
        p.requires_grad_(False)
    tokenmerge.patch(model, method="dtem", r=8, embed_dim=16, tau=0.2)
    model.token_reducer.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 3]))
    loss.backward()
    for i, embed in enumerate(model.token_reducer.embeds):
        assert embed.proj.weight.grad is not None and embed.proj.weight.grad.abs().sum() > 0, i


def test_eval_mode_does_not_touch_the_graph_of_the_embeddings():
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=8, embed_dim=16)
    model.eval()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.token_reducer.parameters())


def test_training_with_small_tau_matches_hard_inference():
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=8, embed_dim=16, tau=1e-5)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hard = model.eval()(x)
        soft_state = model.train().forward_tokens(x)
        soft = model.train()(x)
    assert soft_state.x.shape[1] == 65  # token count stays N in training
    assert soft_state.live == 65 - 3 * 8
    # Merged-away tokens keep a 1e-6 size, hence a faint (not zero) share of attention.
    assert torch.allclose(soft, hard, atol=2e-3)
    model.token_reducer.tau = 0.5
    with torch.no_grad():
        assert not torch.allclose(model.train()(x), hard, atol=2e-3)


def test_keep_norm_is_refused_by_the_soft_training_merge_and_works_at_inference():
    model = tokenmerge.patch(tiny_vit(), method="dtem", r=8, embed_dim=16, keep_norm=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        kept = model.eval()(x)
        plain = tokenmerge.patch(tiny_vit(), method="dtem", r=8, embed_dim=16).eval()(x)
    assert not torch.allclose(kept, plain)
    with pytest.raises(ValueError, match="train with keep_norm=False"):
        model.train()(x)


def test_keys_init_starts_from_tomes_metric():
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=4)  # embed_dim 64 != head width 16: random init
    assert not torch.allclose(model.token_reducer.embeds[0].proj.bias, torch.zeros(1))
    tokenmerge.patch(model, method="dtem", r=4, embed_dim=16)  # fits: keys init
    block, embed = model.blocks[1], model.token_reducer.embeds[1]
    x = torch.randn(2, 65, 32)
    B, N, C = x.shape
    qkv = block.attn.qkv(block.norm1(x)).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
    assert torch.allclose(embed(x), key_metric(qkv[1]), atol=1e-5)
    with pytest.raises(ValueError, match="init='keys'"):
        tokenmerge.patch(model, method="dtem", r=4, embed_dim=8, init="keys")


def test_module_file_roundtrip_and_size(tmp_path):
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=8, embed_dim=16, init="random")
    path = tokenmerge.save_merge_modules(model, tmp_path / "m.safetensors")
    meta = read_merge_module_metadata(path)
    assert (meta["width"], meta["depth"], meta["embed_dim"]) == ("32", "3", "16")
    n_params = sum(p.numel() for p in model.token_reducer.parameters())
    assert path.stat().st_size < 4 * n_params + 4096  # just the embeddings, fp32

    other = tiny_vit()
    torch.manual_seed(1)
    tokenmerge.patch(other, method="dtem", r=8, embed_dim=16, init="random")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(other(x), model(x))
    tokenmerge.load_merge_modules(other, path)
    assert torch.equal(other(x), model(x))


def test_module_file_for_another_model_is_refused(tmp_path):
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=4, embed_dim=16)
    path = tokenmerge.save_merge_modules(model, tmp_path / "m.safetensors")
    wider = tokenmerge.patch(tiny_vit(embed_dim=48), method="dtem", r=4, embed_dim=16)
    with pytest.raises(ValueError, match="width 48"):
        tokenmerge.load_merge_modules(wider, path)
    deeper = tokenmerge.patch(tiny_vit(depth=4), method="dtem", r=4, embed_dim=16)
    with pytest.raises(ValueError, match="4 blocks"):
        tokenmerge.load_merge_modules(deeper, path)
    narrower_embed = tokenmerge.patch(tiny_vit(), method="dtem", r=4, embed_dim=8)
    with pytest.raises(ValueError, match="embed_dim=16"):
        tokenmerge.load_merge_modules(narrower_embed, path)
    with pytest.raises(ValueError, match="not patched with DTEM"):
        tokenmerge.load_merge_modules(tokenmerge.patch(tiny_vit(), method="tome", r=4), path)
    (tmp_path / "plain.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"plain\.safetensors.*cannot be read"):
        tokenmerge.load_merge_modules(model, tmp_path / "plain.safetensors")


def test_patch_with_a_module_file_in_one_call(tmp_path):
    trained = tiny_vit()
    tokenmerge.patch(trained, method="dtem", r=8, embed_dim=16, hidden_dim=8, init="random")
    path = tokenmerge.save_merge_modules(trained, tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    # embed_dim/hidden_dim come from the file; the form best.json uses (options=) works too
    one_call = tokenmerge.patch(tiny_vit(), method="dtem", r=8, options={"modules": str(path)})
    assert (one_call.token_reducer.embed_dim, one_call.token_reducer.hidden_dim) == (16, 8)
    assert torch.equal(one_call(x), trained(x))
    # a reducer built with dim/depth loads at once, and keeps its (further trained) weights when bound
    reducer = DTEM(modules=path, dim=32, depth=3)
    with torch.no_grad():
        reducer.embeds[0].norm.weight.add_(1.0)
    changed = reducer.embeds[0].norm.weight.clone()
    tokenmerge.patch(tiny_vit(), method=reducer, r=8)
    assert torch.equal(reducer.embeds[0].norm.weight, changed)
    with pytest.raises(ValueError, match="embed_dim=32 disagrees with the module file"):
        tokenmerge.patch(tiny_vit(), method="dtem", r=8, modules=str(path), embed_dim=32)
    with pytest.raises(ValueError, match="width 48"):
        tokenmerge.patch(tiny_vit(embed_dim=48), method="dtem", r=8, modules=str(path))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        tokenmerge.patch(tiny_vit(), method="dtem", r=8, modules=str(tmp_path / "missing.safetensors"))
    with pytest.raises(TypeError, match="modules"):
        tokenmerge.patch(tiny_vit(), method="tome", r=8, modules=str(path))


def test_damaged_module_files_are_named_and_change_nothing(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="dtem", r=4, embed_dim=16)
    path = tokenmerge.save_merge_modules(model, tmp_path / "m.safetensors")
    meta = read_merge_module_metadata(path)
    state = load_file(str(path))
    before = {k: v.clone() for k, v in model.token_reducer.state_dict().items()}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match=r"truncated\.safetensors.*corrupt, truncated"):
        tokenmerge.load_merge_modules(model, truncated)
    poisoned = dict(state)
    first = sorted(poisoned)[0]
    poisoned[first] = torch.full_like(poisoned[first], float("nan"))
    save_file(poisoned, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=rf"nan\.safetensors.*non-finite.*{first}"):
        tokenmerge.load_merge_modules(model, tmp_path / "nan.safetensors")
    short = {k: v for k, v in state.items() if k != first}
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"short\.safetensors' does not hold the modules.*missing"):
        tokenmerge.load_merge_modules(model, tmp_path / "short.safetensors")
    save_file(state, str(tmp_path / "meta.safetensors"), metadata=dict(meta, width="wide"))
    with pytest.raises(ValueError, match=r"meta\.safetensors.*bad 'width'"):
        tokenmerge.load_merge_modules(model, tmp_path / "meta.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in model.token_reducer.state_dict().items())


def test_non_finite_modules_are_not_saved(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="dtem", r=4, embed_dim=16)
    path = tokenmerge.save_merge_modules(model, tmp_path / "m.safetensors")
    with torch.no_grad():
        next(model.token_reducer.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"refusing to write .*m\.safetensors.*non-finite"):
        tokenmerge.save_merge_modules(model, path)
    assert all(torch.isfinite(v).all() for v in load_file(str(path)).values())


def test_modules_load_with_a_full_state_dict():
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=8, embed_dim=16, init="random")
    state = model.state_dict()
    assert any(k.startswith("token_reducer.embeds.0.") for k in state)
    other = tiny_vit()
    torch.manual_seed(1)
    tokenmerge.patch(other, method="dtem", r=8, embed_dim=16, init="random")
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(other(x), model(x))
    other.load_state_dict(state)
    assert torch.equal(other(x), model(x))


def test_one_module_set_serves_smaller_r():
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=8, embed_dim=16, init="random")
    reducer = model.token_reducer
    before = copy.deepcopy(reducer.state_dict())
    tokenmerge.patch(model, method=reducer, r=4)
    assert model.token_reducer is reducer
    assert model.tokens_per_block()[-1] == 65 - 3 * 4
    assert all(torch.equal(v, before[k]) for k, v in reducer.state_dict().items())
    with pytest.raises(ValueError, match="width 32 and depth 3"):
        tokenmerge.patch(tiny_vit(depth=2), method=reducer, r=4)


def test_bad_options_are_rejected():
    for tau in (0, -1.0):
        with pytest.raises(ValueError, match="tau"):
            tokenmerge.patch(tiny_vit(), method="dtem", r=4, tau=tau)
    with pytest.raises(ValueError, match="embed_dim"):
        DTEM(embed_dim=0)
    with pytest.raises(ValueError, match="dim= and depth="):
        DTEM(dim=32)
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=4, embed_dim=16, trace_source=True)
    with pytest.raises(ValueError, match="source tracking"):
        model.train()(torch.randn(1, 3, 32, 32))


def test_train_r_overrides_the_schedule_in_training_only():
    model = tiny_vit()
    tokenmerge.patch(model, method="dtem", r=4, embed_dim=16, train_r=10)
    with torch.no_grad():
        assert model.train().forward_tokens(torch.randn(1, 3, 32, 32)).live == 65 - 30
        assert model.eval().forward_tokens(torch.randn(1, 3, 32, 32)).x.shape[1] == 65 - 12


def test_agglomerative_matching_clusters_the_learned_embedding_with_the_state_sizes():
    from tokenmerge.core.clustering import agglomerative_plan
    from tokenmerge.core.merge import merge_tokens
    from tokenmerge.methods.base import TokenState

    from .test_atc import reference_clusters

    torch.manual_seed(3)
    reducer = DTEM(embed_dim=8, init="random", dim=6, depth=2, matching="agglomerative", tau_size=0.5).eval()
    x = torch.randn(2, 13, 6, dtype=torch.float64)
    size = torch.randint(1, 9, (2, 13, 1)).double()
    reducer.double()
    out = reducer.reduce(TokenState(x, size), None, 5, 1, 1)
    embedding = reducer.embeds[1](x)
    assert out.x.shape[1] == 8 and torch.equal(out.size.sum(1), size.sum(1))
    for k in range(2):
        groups = [[0]] + [[1 + i for i in c] for c in
                          reference_clusters(embedding[k, 1:].detach(), 5, "complete", size[k, 1:, 0], 0.5)]
        expected = torch.stack([(x[k, g] * size[k, g]).sum(0) / size[k, g].sum() for g in groups])
        torch.testing.assert_close(out.x[k], expected)
    # Not bipartite matching on the same embedding, and not the embedding of block 0.
    bipartite = DTEM(embed_dim=8, init="random", dim=6, depth=2).double().eval()
    bipartite.load_state_dict(reducer.state_dict())
    assert not torch.allclose(bipartite.reduce(TokenState(x, size), None, 5, 1, 1).x, out.x)
    other_block = merge_tokens(x, size, agglomerative_plan(reducer.embeds[0](x), 5, 1, "complete", size, 0.5))[0]
    assert not torch.allclose(other_block, out.x)


def test_agglomerative_matching_removes_more_than_half_at_inference_and_trains_bipartite():
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(x)
    tokenmerge.patch(model, method="dtem", r=0, embed_dim=16, matching="agglomerative")
    with torch.no_grad():
        assert torch.equal(model(x), reference)
    tokenmerge.patch(model, method=model.token_reducer, r=[40, 10, 5])  # 40 of 64: beyond bipartite's 32
    assert model.tokens_per_block() == [65, 25, 15, 10]
    with torch.no_grad():
        assert model.eval().forward_tokens(x).x.shape[1] == 10
    with pytest.raises(ValueError, match=r"soft bipartite merge.*train_r=32 \(CLI: --method-option train_r=32\)"):
        model.train()(x)
    tokenmerge.patch(model, r=[8, 8, 8], method="dtem", embed_dim=16, matching="agglomerative")
    model.train()(x).sum().backward()  # training runs the soft bipartite merge at r <= half
    assert all(embed.proj.weight.grad is not None for embed in model.token_reducer.embeds)
    tokenmerge.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), reference)


def test_matching_options_are_checked():
    with pytest.raises(ValueError, match="matching must be one of"):
        DTEM(matching="greedy")
    with pytest.raises(ValueError, match="add matching='agglomerative'"):
        DTEM(linkage="average")
    with pytest.raises(ValueError, match="add matching='agglomerative'"):
        DTEM(tau_size=None)
    with pytest.raises(ValueError, match="linkage must be one of"):
        DTEM(matching="agglomerative", linkage="median")
    with pytest.raises(ValueError, match="tau_size must be > 0"):
        DTEM(matching="agglomerative", tau_size=0.0)
    assert "linkage='average'" in repr(DTEM(matching="agglomerative", linkage="average"))


def test_training_a_bfloat16_model_with_float32_modules():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                              num_classes=5).to(torch.bfloat16).train()
    tokenmerge.patch(model, method="dtem", r=2)
    assert model.token_reducer.embeds[0].norm.weight.dtype == torch.float32
    out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.token_reducer.parameters())
