"""ONNX export: ONNX Runtime reproduces the patched model, the CLI writes the file, and what
cannot be exported exactly is refused with a clear error."""

from __future__ import annotations

import sys

import onnxruntime as ort
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.backends.adapter import adapter_for
from tokenmerge.cli import main
from tokenmerge.core.energy import plan_from_pairs
from tokenmerge.core.ops import add_rows, stable_argsort_descending
from tokenmerge.export import export_onnx, export_program

from .conftest import HF_TINY, tiny_hf_classifier


pytestmark = pytest.mark.usefixtures("one_thread")


# The CLI's way to the architecture of tiny_vit() (random weights: the checkpoint is not needed).
TINY_CLI = ["vit_tiny_patch16_224", "--num-classes", "4", "--model-kwargs",
            '{"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}']


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=4)
    return VisionTransformer(**{**config, **kwargs}).eval()


def onnx_logits(path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def assert_onnx_matches(model, path, batch_sizes=(1, 3)):
    for batch in batch_sizes:
        images = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            expected = model(images)
        got = onnx_logits(path, images)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("method, options", [
    ("tome", {}),
    ("dtem", {}),
    ("dtem", {"matching": "agglomerative"}),
    ("tcvit", {}),
    ("mctf", {}),
    ("pitome", {}),
    ("atc", {}),
    ("evit", {}),
    ("prune", {}),
    ("drop", {}),
    ("tome", {"layout": "local"}),
    ("tome", {"trace_source": True}),
    ("mctf", {"keep_norm": True}),
    ("tome", {"mlp_share": 1.0}),
])
def test_onnx_runtime_matches_pytorch_at_any_batch(tmp_path, method, options):
    model = tokenmerge.patch(tiny_vit(), method=method, r=8, **options)
    result = export_onnx(model, tmp_path / "m.onnx", check=True)
    assert result.max_abs_diff <= 1e-4 and result.argmax_agreement == 1.0
    assert result.input_shape == ("batch", 3, 32, 32)
    assert_onnx_matches(model, result.path)
    assert model.tokenmerge_schedule() == (8, 8, 8)
    assert list(model._tokenmerge_schedules) == [65]  # resolved from an int, not a traced size


@pytest.mark.parametrize("schedule", [0, (8, -1), tokenmerge.KeepRatio(0.8)])
def test_schedules_export(tmp_path, schedule):
    model = tokenmerge.patch(tiny_vit(global_pool="avg", reg_tokens=2), method="tome", r=schedule)
    path = export_onnx(model, tmp_path / "m.onnx").path
    assert_onnx_matches(model, path)


def test_unmodified_model_and_static_batch(tmp_path):
    model = tiny_vit()
    result = export_onnx(model, tmp_path / "m.onnx", batch_size=2, dynamic_batch=False, check=True)
    assert result.input_shape == (2, 3, 32, 32)
    assert_onnx_matches(model, result.path, batch_sizes=(2,))
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        onnx_logits(result.path, torch.randn(3, 3, 32, 32))


def test_export_leaves_the_model_as_it_was(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="dtem", r=8)
    model.train()
    export_onnx(model, tmp_path / "m.onnx")
    assert model.training and model.token_reducer.training


class _AddRows(torch.nn.Module):
    def forward(self, out, index, rows):
        return add_rows(out, index, rows)


class _Order(torch.nn.Module):
    def forward(self, scores):
        return stable_argsort_descending(scores)


def export_and_run(module, inputs: dict, path):
    """``module`` exported by the TorchScript exporter, run in ONNX Runtime on ``inputs``."""
    torch.onnx.export(module, tuple(inputs.values()), str(path), dynamo=False, opset_version=17,
                      input_names=list(inputs))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in inputs.items()})[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, chosen on purpose
def test_export_forms_reproduce_the_eager_ops(tmp_path):
    out, index, rows = torch.randn(7, 5), torch.randint(0, 7, (40,)), torch.randn(40, 5)
    eager = add_rows(out.clone(), index, rows)
    got = export_and_run(_AddRows(), {"out": out, "index": index, "rows": rows}, tmp_path / "add.onnx")
    assert torch.equal(torch.from_numpy(got), eager)  # repeated indices summed, in the same order

    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1, 0.9, 0.5]])
    assert stable_argsort_descending(scores).tolist() == [[1, 4, 0, 2, 5, 3]]
    assert export_and_run(_Order(), {"scores": scores}, tmp_path / "sort.onnx").tolist() == [[1, 4, 0, 2, 5, 3]]

    plan = plan_from_pairs(torch.tensor([[1, 3]]), torch.tensor([[4, 0]]), 5)
    assert plan.assign.tolist() == [[0, 2, 1, 0, 2]] and plan.num_out == 3


def test_torch_export_program_matches(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="tome", r=8)
    program = export_program(model)
    torch.export.save(program, tmp_path / "tome.pt2")  # what `tokenmerge export --program` writes
    loaded = torch.export.load(tmp_path / "tome.pt2")
    for batch in (2, 5):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(program.module()(images), model(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.module()(images), model(images), atol=1e-5, rtol=0)


def test_torch_export_program_of_a_bfloat16_model_runs_in_bfloat16():
    model = tokenmerge.patch(tiny_vit().to(torch.bfloat16), method="tome", r=8)
    program = export_program(model)
    images = torch.randn(3, 3, 32, 32, dtype=torch.bfloat16)
    out = program.module()(images)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, model(images))


def test_torch_export_program_batch_sizes():
    model = tokenmerge.patch(tiny_vit(), method="tome", r=8)
    # A dynamic batch is traced at 2 or more whatever the example batch: a batch of 1 would
    # specialise the program to it.
    program = export_program(model, batch_size=1)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(program.module()(images), model(images), atol=1e-5, rtol=0)
    static = export_program(model, batch_size=1, dynamic_batch=False)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(static.module()(images), model(images), atol=1e-5, rtol=0)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"batch_size must be a positive int, got {bad!r}"):
            export_program(model, batch_size=bad)


def test_atc_with_a_threshold_is_refused_naming_the_fixed_r_form(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="atc", r=8, threshold=0.5)
    with pytest.raises(ValueError, match=r"cannot export method 'atc'.*drop the threshold \(use a fixed r\) to "
                                         r"export; the deterministic methods export \(atc, "):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    tokenmerge.patch(model, method="atc", r=8)  # the same method at a fixed r exports
    assert_onnx_matches(model, export_onnx(model, tmp_path / "m.onnx").path)


def test_a_missing_onnx_package_names_the_install(tmp_path, monkeypatch, capsys):
    model = tokenmerge.patch(tiny_vit(), method="tome", r=8)
    monkeypatch.setitem(sys.modules, "onnx", None)  # what `import onnx` meets where it is not installed
    with pytest.raises(ImportError, match=r"onnx is not installed: pip install 'tokenmerge\[export\]'"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []
    # The CLI says so too, and offers no --no-check: that skips ONNX Runtime, not onnx.
    out = tmp_path / "cli.onnx"
    assert main(["export", *TINY_CLI, "--method", "tome", "--r", "8", "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnx is not installed: pip install 'tokenmerge[export]'" in err and "--no-check" not in err
    assert not out.exists()


def test_a_missing_onnxruntime_offers_to_skip_the_check(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    out = tmp_path / "cli.onnx"
    assert main(["export", *TINY_CLI, "--method", "tome", "--r", "8", "--onnx", str(out)]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime is not installed" in err and "pass --no-check to export without checking" in err


def test_random_method_is_refused(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="random", r=8)
    with pytest.raises(ValueError, match="method 'random'.*torch.Generator.*deterministic method"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_dynamic_img_size_is_refused_once_patched(tmp_path):
    model = tokenmerge.patch(tiny_vit(dynamic_img_size=True), method="tome", r=8)
    with pytest.raises(ValueError, match="dynamic_img_size=True.*schedule.*dynamic_img_size=False"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    tokenmerge.unpatch(model)
    assert_onnx_matches(model, export_onnx(model, tmp_path / "m.onnx").path)  # no schedule: exported


def tiny_eva(**kwargs):
    """A timm ``Eva`` (default: EVA-02's RoPE 'cat', SwiGLU, q/v bias) with logits of order one."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                  mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2))
    model = Eva(**{**config, **kwargs}).eval()
    with torch.no_grad():
        model.head.weight.normal_()  # timm's init gives logits too small for atol to mean anything
    return model


EVA_VARIANTS = {
    "eva02": {},
    # ViT-RoPE mixed: learnt per-block frequencies, AttentionRope
    "rope_mixed": dict(rope_type="mixed", attn_type="rope", use_abs_pos_emb=False, rope_grid_indexing="xy",
                       init_values=1e-2, global_pool="token", swiglu_mlp=False, scale_mlp=False, mlp_ratio=4),
    # DINOv3-like: centred coordinates, registers, grouped-query k/v, qk-norm
    "dinov3_gqa": dict(num_heads=4, num_kv_heads=2, qkv_fused=False, attn_type="rope", qk_norm=True,
                       rope_type="dinov3", use_abs_pos_emb=False, num_reg_tokens=4, init_values=1e-2),
}


@pytest.mark.parametrize("variant, method, r", [
    ("eva02", "tome", 2), ("eva02", "mctf", 2), ("rope_mixed", "tome", 2), ("dinov3_gqa", "tome", 2),
    ("rope_mixed", "tome", 0),
])
def test_a_merging_eva_exports_and_onnx_runtime_matches(tmp_path, variant, method, r):
    # Each block rebuilds the rotation from the merged tokens' coordinates; it exports as Sin/Cos.
    model = tokenmerge.patch(tiny_eva(**EVA_VARIANTS[variant]), method=method, r=r)
    result = export_onnx(model, tmp_path / "eva.onnx", check=True)
    assert result.max_abs_diff <= 1e-4 and result.argmax_agreement == 1.0
    assert result.input_shape == ("batch", 3, 32, 32)
    assert_onnx_matches(model, result.path, batch_sizes=(1, 3))
    assert model.tokenmerge_schedule() == (r,) * 3
    assert not model.training and tokenmerge.is_patched(model)


def test_a_merging_eva_with_dynamic_img_size_is_refused(tmp_path):
    model = tokenmerge.patch(tiny_eva(dynamic_img_size=True), method="tome", r=2)
    with pytest.raises(ValueError, match="dynamic_img_size=True.*schedule.*dynamic_img_size=False"):
        export_onnx(model, tmp_path / "eva.onnx")
    assert not (tmp_path / "eva.onnx").exists()


def test_an_unpatched_eva_is_refused_with_the_r0_fix(tmp_path):
    # timm's own Eva attention fails inside the exporter; the named fix (r=0) exports it exactly.
    model = tiny_eva()
    with pytest.raises(ValueError, match=r"unpatched Eva.*tokenmerge.patch\(model, r=0\)"):
        export_onnx(model, tmp_path / "eva.onnx")
    assert not (tmp_path / "eva.onnx").exists()
    result = export_onnx(tokenmerge.patch(model, r=0), tmp_path / "eva.onnx", check=True)
    assert result.max_abs_diff <= 1e-4 and result.argmax_agreement == 1.0


def test_other_image_size_opset_device_and_models_are_refused(tmp_path):
    model = tokenmerge.patch(tiny_vit(), method="tome", r=8)
    with pytest.raises(ValueError, match="image_size 64x64: the model is built for 32x32"):
        export_onnx(model, tmp_path / "m.onnx", image_size=64)
    with pytest.raises(ValueError, match="opset must be an int in 16..20"):
        export_onnx(model, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match=r"float32 model on the CPU.*model.float\(\).cpu\(\)"):
        export_onnx(model.to(torch.float64), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=r"cannot export: .*torch.nn.modules.linear.Linear: supported models are timm.*Hugging Face"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_round_trip(tmp_path, capsys):
    out = tmp_path / "tiny.onnx"
    checkpoint = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    model = tiny_vit()
    save_file(model.state_dict(), str(checkpoint))
    kwargs = '{"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}'
    code = main(["export", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--model-kwargs", kwargs,
                 "--method", "tome", "--r", "8", "--onnx", str(out), "--batch-size", "2"])
    assert code == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "top-1 agreement 100%" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert_onnx_matches(tokenmerge.patch(model, method="tome", r=8), out)


def test_cli_names_a_checkpoint_without_a_model_name_as_that_checkpoint(tmp_path, capsys):
    """Weights from --checkpoint are not the embedded model, even on its architecture."""
    from safetensors.torch import save_file

    checkpoint = tmp_path / "finetuned.safetensors"
    save_file(tiny_vit().state_dict(), str(checkpoint))
    kwargs = '{"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2}'
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--model-kwargs", kwargs, "--method", "tome",
                 "--r", "8", "--onnx", str(out), "--no-check"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out} (vit_tiny_patch16_224 (checkpoint finetuned.safetensors), tome r=8;" in text
    assert "embedded" not in text


def test_cli_errors(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", "--method", "random", "--r", "8", "--onnx", str(out)]) == 2
    assert "cannot export method 'random'" in capsys.readouterr().err
    assert main(["export", "--method", "tome", "--onnx", str(out)]) == 2
    assert "--r is required with --method tome" in capsys.readouterr().err
    assert main(["export", "--method", "tome", "--r", "8"]) == 2
    assert "give --onnx FILE and/or --program FILE" in capsys.readouterr().err
    assert not out.exists()


# --- Hugging Face image classifiers, found by the adapter ------------------------------------
def hf_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(images).logits


@pytest.mark.parametrize("kind, method", [
    ("vit", "tome"), ("vit", "dtem"), ("vit", "tcvit"), ("deit_teacher", "tome"), ("dinov2", "tome"),
    ("clip_classifier", "mctf"),
])
def test_hugging_face_classifiers_export_and_onnx_runtime_matches(tmp_path, kind, method):
    model = tokenmerge.patch(tiny_hf_classifier(kind), method=method, r=2)
    result = export_onnx(model, tmp_path / "m.onnx", check=True)
    assert result.max_abs_diff <= 1e-5 and result.argmax_agreement == 1.0
    assert result.input_shape == ("batch", 3, 32, 32)
    for batch in (1, 3):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(onnx_logits(result.path, images), hf_logits(model, images), atol=1e-5, rtol=0)
    assert not model.training and tokenmerge.is_patched(model)  # left as it was, merging
    assert adapter_for(model).tokens_per_block()[-1] == adapter_for(model).num_tokens - 4


def test_hugging_face_export_program_and_image_sizes(tmp_path):
    model = tokenmerge.patch(tiny_hf_classifier("vit"), method="tome", r=2)
    program = export_program(model)
    for batch in (2, 5):
        images = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(program.module()(images), hf_logits(model, images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_size 48x48: the model is built for 32x32"):
        export_onnx(model, tmp_path / "m.onnx", image_size=48)
    # DINOv2 interpolates its position embeddings: unpatched, it exports at another size too.
    dinov2 = tiny_hf_classifier("dinov2")
    path = export_onnx(dinov2, tmp_path / "d.onnx", image_size=48, check=True).path
    images = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(onnx_logits(path, images), hf_logits(dinov2, images), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="image_size 48x48: the model is built for 32x32"):
        export_onnx(tokenmerge.patch(dinov2, method="tome", r=2), tmp_path / "d.onnx", image_size=48)


def test_hugging_face_models_without_logits_or_images_are_refused(tmp_path):
    import transformers

    trunk = transformers.ViTModel(transformers.ViTConfig(**{k: v for k, v in HF_TINY.items() if k != "num_labels"}))
    with pytest.raises(TypeError, match="cannot export ViTModel: .*no classification head.*ForImageClassification"):
        export_onnx(tokenmerge.patch(trunk, method="tome", r=2), tmp_path / "m.onnx")
    audio = transformers.ASTForAudioClassification(transformers.ASTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_length=32,
        num_mel_bins=32, num_labels=3))
    with pytest.raises(TypeError, match="cannot export: ASTModel takes spectrograms, not images"):
        export_onnx(audio, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_hugging_face_folder(hf_vit_dir, tmp_path, capsys):
    from tokenmerge.models import load_model

    out = tmp_path / "hf.onnx"
    assert main(["export", f"hf:{hf_vit_dir}", "--method", "tome", "--r", "2", "--onnx", str(out),
                 "--batch-size", "2"]) == 0
    assert "top-1 agreement 100%" in capsys.readouterr().out
    model = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), method="tome", r=2)
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(onnx_logits(out, images), hf_logits(model, images), atol=1e-5, rtol=0)
