"""``tokenmerge train`` on audio (AST, spectrograms) and video (VideoMAE, ViViT) classifiers: the data
comes from the modality the model's adapter names, read by the evaluation loaders; the tiny
random models and generated WAV/mp4 folders of ``test_cli_media``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmerge.models import load_model  # noqa: E402
from tokenmerge.training import TrainConfig, train  # noqa: E402

from .test_cli_media import ast_dir, video_folder, videomae_dir, vivit_dir, wav_folder  # noqa: E402,F401 (fixtures)
from .test_training import assert_killed_run_resumes_identically  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# (model fixture, data fixture, trunk attribute, tokens into the first layer, r)
MODELS = {
    "ast": ("ast_dir", "wav_folder", "audio_spectrogram_transformer", 10, 2),  # 8 patches + 2
    "videomae": ("videomae_dir", "video_folder", "videomae", 32, 4),  # 2 x 4 x 4 tubelets
    "vivit": ("vivit_dir", "video_folder", "vivit", 33, 4),  # the class token too
}


def _config(model_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(method="dtem", mode="modular", data=str(data), model=f"hf:{model_dir}", r=2, tau=0.2,
                embed_dim=16, max_steps=3, batch_size=2, lr=1e-2, backbone_lr=1e-2, warmup_steps=1,
                out=str(out), checkpoint_every=2, progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _record_tokens(model) -> list:
    """``(training, tokens)`` entering the last of the 2 layers in each forward, seen by its
    first norm (the layer itself is run by the merging trunk, not through its ``__call__``)."""
    from tokenmerge.backends.adapter import adapter_for

    norm = next(m for m in adapter_for(model).blocks[-1].modules() if isinstance(m, torch.nn.LayerNorm))
    seen = []
    norm.register_forward_hook(lambda module, inputs, output: seen.append((module.training, inputs[0].shape[1])))
    return seen


def _setup(request, kind):
    model_fixture, data_fixture, trunk, tokens, r = MODELS[kind]
    return request.getfixturevalue(model_fixture), request.getfixturevalue(data_fixture), trunk, tokens, r


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_dtem_modular_learns_only_the_merge_embeddings_on_media(request, kind, tmp_path):
    model_dir, data, trunk, tokens, r = _setup(request, kind)
    model = load_model(f"hf:{model_dir}")
    original = _state(model)
    seen = _record_tokens(model)
    summary = train(_config(model_dir, data, tmp_path, r=r, distill=True, eval_r=[r], eval_data=str(data)),
                    model=model)
    # Frozen model in eval mode; soft merging keeps every token while training.
    assert seen[:3] == [(False, tokens)] * 3
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model"] and all(k.startswith(f"{trunk}.token_reducer.") for k in ckpt["model"])
    for key, value in original.items():
        assert torch.equal(model.state_dict()[key], value), key
    trained = ckpt["model"]
    fresh = tokenmerge_patch(load_model(f"hf:{model_dir}"), method="dtem", r=r, embed_dim=16)
    initial = {f"{trunk}.token_reducer.{k}": v for k, v in getattr(fresh, trunk).token_reducer.state_dict().items()}
    assert initial.keys() == trained.keys()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    # Evaluation after training reads the val folder with the same loader: 6 clips, hard merging.
    assert set(summary["accuracy"]) == {str(r)} and 0 <= summary["accuracy"][str(r)] <= 100
    assert seen[-1] == (False, tokens - r)
    assert (tmp_path / "dtem_modules.safetensors").is_file() and not (tmp_path / "model").exists()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tome_end2_end_fine_tunes_media_models(request, kind, tmp_path):
    model_dir, data, trunk, tokens, r = _setup(request, kind)
    model = load_model(f"hf:{model_dir}")
    original = _state(model)
    seen = _record_tokens(model)
    train(_config(model_dir, data, tmp_path, method="tome", mode="end2end", r=r), model=model)
    assert seen == [(True, tokens - r)] * 3  # r removed by the first layer, in every step
    trained = load_model(f"hf:{tmp_path / 'model'}")  # save_pretrained: loads without tokenmerge
    assert type(trained).__name__ == type(model).__name__
    assert trained.state_dict().keys() == original.keys()
    changed = [k for k in original if not torch.equal(trained.state_dict()[k], original[k])]
    # The layers' weights (AST's are renamed to layers.N by the loader, as ViViT's are; VideoMAE's
    # keep encoder.layer.N).
    assert any(re.match(rf"{trunk}\.(layers|encoder\.layer)\.\d+\.", k) for k in changed)
    assert any(k.startswith("classifier.") for k in changed)


def test_killed_audio_run_resumes_to_identical_parameters(ast_dir, wav_folder, tmp_path):  # noqa: F811
    settings = dict(method="dtem", mode="end2end", distill=True, max_steps=5)
    assert_killed_run_resumes_identically(lambda out: _config(ast_dir, wav_folder, out, **settings), tmp_path)


def test_a_data_folder_of_another_modality_is_refused_naming_what_the_model_takes(
        ast_dir, wav_folder, videomae_dir, video_folder, tiny_image_folder, tmp_path):  # noqa: F811
    def never(step):
        raise AssertionError("training started")

    with pytest.raises(ValueError, match=r"audio-spectrogram-transformer takes spectrograms: --data must be a "
                                         r"folder with one sub-folder per class of WAV/FLAC files, but .*no "
                                         r"\.wav/\.flac files"):
        train(_config(ast_dir, tiny_image_folder, tmp_path / "a"), on_step=never)
    with pytest.raises(ValueError, match=r"videomae takes videos: --data must be a folder with one sub-folder "
                                         r"per class of video \(MP4"):
        train(_config(videomae_dir, wav_folder, tmp_path / "b"), on_step=never)
    with pytest.raises(ValueError, match=r"takes spectrograms: --eval-data must be a folder .*WAV/FLAC"):
        train(_config(ast_dir, wav_folder, tmp_path / "c", eval_r=[2], eval_data=str(video_folder)), on_step=never)
    # A teacher that cannot take the student's inputs: named with their shape and modality.
    with pytest.raises(ValueError, match=r"teacher cannot classify the student's 48x32 spectrograms"):
        train(_config(ast_dir, wav_folder, tmp_path / "e", distill=True, teacher=f"hf:{videomae_dir}"),
              on_step=never)
    # A classifier with another class count than the data's folders: named before step 1.
    with pytest.raises(ValueError, match=r"head predicts 3 classes but the training data .* has 2 class folders"):
        two = tmp_path / "two"
        for name in ("low", "mid"):
            (two / name).mkdir(parents=True)
            for wav in (wav_folder / name).iterdir():
                (two / name / wav.name).write_bytes(wav.read_bytes())
        train(_config(ast_dir, two, tmp_path / "d"), on_step=never)
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_an_audio_encoder_without_a_head_is_refused(ast_dir, wav_folder, tmp_path):  # noqa: F811
    trunk = transformers.ASTModel.from_pretrained(ast_dir)
    with pytest.raises(TypeError, match=r"training needs a classifier.*ASTModel has no classification head.*"
                                        r"ASTForAudioClassification"):
        train(_config(ast_dir, wav_folder, tmp_path / "a"), model=trunk)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("kind", ["ast", "vivit"])
def test_cli_trains_a_media_classifier(request, kind, tmp_path):
    from tokenmerge.cli import main

    model_dir, data, _, _, _ = _setup(request, kind)
    out = tmp_path / "run"
    assert main(["train", f"hf:{model_dir}", "--data", str(data), "--eval-data", str(data),
                 "--r", "2", "--embed-dim", "16", "--max-steps", "2", "--batch-size", "2", "--limit", "4",
                 "--distill", "--distill-weight", "1.0", "--no-progress", "--threads", "1",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"2"} and results["files"]["merge_modules"].endswith("dtem_modules.safetensors")


def tokenmerge_patch(model, **kwargs):
    import tokenmerge

    return tokenmerge.patch(model, **kwargs)
