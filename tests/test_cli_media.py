"""``tokenmerge eval``/``bench``/``visualize`` on audio (AST) and video (VideoMAE, ViViT) models
saved as ``hf:DIR``, with data folders of tiny generated WAV and H.264 files; clear errors for
broken files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from tokenmerge.cli import main  # noqa: E402
from tokenmerge.evaluation.audio import load_wav, log_mel  # noqa: E402
from tokenmerge.evaluation.inputs import inputs_for  # noqa: E402
from tokenmerge.evaluation.video import prepare_clip, read_video, write_video  # noqa: E402
from tokenmerge.models import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

RATE = 16000
# Not ImageNet's or AudioSet's statistics: the test sees whether the saved ones are used.
VIDEO_MEAN, VIDEO_STD = [0.3, 0.4, 0.5], [0.2, 0.25, 0.3]
AUDIO_MEAN, AUDIO_STD = -6.0, 3.0


def _save(model, folder, preprocessor: dict):
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module")
def videomae_dir(tmp_path_factory):
    """A random VideoMAE classifier: 4 frames of 32x32, tubelets 2 x 8x8 -> 32 tokens, 3 classes."""
    config = transformers.VideoMAEConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_frames=4, tubelet_size=2, num_labels=3, use_mean_pooling=True)
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 2.0)  # spread the predictions over the classes
    return _save(model, tmp_path_factory.mktemp("videomae"), {"image_mean": VIDEO_MEAN, "image_std": VIDEO_STD})


@pytest.fixture(scope="module")
def vivit_dir(tmp_path_factory):
    """A random ViViT classifier: 4 frames of 32x32, tubelets 2 x 8x8 -> class token + 32, 3
    classes; its preprocessor_config.json written by VivitImageProcessor (shorter side 36)."""
    config = transformers.VivitConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        num_frames=4, tubelet_size=[2, 8, 8], num_labels=3)
    torch.manual_seed(0)
    model = transformers.VivitForVideoClassification(config).eval()
    with torch.no_grad():
        # HF initialises the class token and position embeddings to zero: make them matter.
        model.vivit.embeddings.cls_token.normal_(0.0, 1.0)
        model.vivit.embeddings.position_embeddings.normal_(0.0, 0.5)
        model.classifier.weight.normal_(0.0, 2.0)
    folder = tmp_path_factory.mktemp("vivit")
    model.save_pretrained(folder)
    transformers.VivitImageProcessor(image_mean=VIDEO_MEAN, image_std=VIDEO_STD, size={"shortest_edge": 36},
                                     crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# Per video model: (model fixture, tokens into the first block, its image processor class).
VIDEO_MODELS = {
    "videomae": ("videomae_dir", 32, "VideoMAEImageProcessor"),  # 2 x 4 x 4 tubelets
    "vivit": ("vivit_dir", 33, "VivitImageProcessor"),  # the class token too
}


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory):
    """3 classes x 2 clips of 6 frames at 40x48 (resized and cropped to 32x32, 4 frames sampled)."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir()
        for i in range(2):
            write_video(root / name / f"{i}.mp4", rng.integers(0, 256, size=(6, 40, 48, 3), dtype=np.uint8))
    return root


@pytest.fixture(scope="module")
def ast_dir(tmp_path_factory):
    """A random AST classifier: 48 frames x 32 mel bins -> 8 patches + 2 tokens, 3 classes."""
    config = transformers.ASTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_mel_bins=32,
        max_length=48, frequency_stride=10, time_stride=10, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ASTForAudioClassification(config).eval()
    with torch.no_grad():
        model.classifier.dense.weight.normal_(0.0, 2.0)
    return _save(model, tmp_path_factory.mktemp("ast"),
                 {"feature_extractor_type": "ASTFeatureExtractor", "sampling_rate": RATE, "num_mel_bins": 32,
                  "max_length": 48, "mean": AUDIO_MEAN, "std": AUDIO_STD})


@pytest.fixture(scope="module")
def wav_folder(tmp_path_factory):
    """3 classes x 2 tones of 0.5 s."""
    import soundfile as sf

    root = tmp_path_factory.mktemp("wavs")
    t = np.arange(RATE // 2) / RATE
    for k, name in enumerate(("low", "mid", "high")):
        (root / name).mkdir()
        for i in range(2):
            tone = 0.5 * np.sin(2 * math.pi * (200 * (k + 1) + 50 * i) * t)
            sf.write(root / name / f"{i}.wav", tone.astype(np.float32), RATE)
    return root


def _files(root):
    return [(path, label) for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir()))
            for path in sorted(folder.iterdir())]


def _accuracy(model, inputs, labels) -> float:
    with torch.inference_mode():
        predictions = model(inputs).logits.argmax(-1)
    return 100.0 * float((predictions == torch.tensor(labels)).double().mean())


def _eval(folder, data, out, *extra):
    return main(["eval", f"hf:{folder}", "--data", str(data), "--methods", "tome", "drop", "--r", "2", "4",
                 "--out", str(out), "--timing-batch-size", "2", "--warmup", "0", "--repeats", "1",
                 "--device", "cpu", *extra])


def _reference_clip(path, family: str) -> torch.Tensor:
    """A clip of ``video_folder`` as each model's saved processor settings make it, computed
    without tokenmerge's data loading: frames 0, 2, 3, 5 of 6, bilinear on the shorter side,
    centre crop to 32x32, the processor's rescale, then the saved statistics."""
    import av

    with av.open(str(path)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    x = torch.from_numpy(frames[[0, 2, 3, 5]]).permute(0, 3, 1, 2).float()

    def resize(size):
        return torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)

    if family == "videomae":  # shorter side 32 (= the crop): 32x38, columns 3..34; x / 255
        x = resize((32, 38))[..., 3:35] / 255
    else:  # ViViT: the saved shortest_edge 36: 36x43, rows 2..33, columns 5..36; x / 127.5 - 1
        x = resize((36, 43))[..., 2:34, 5:37] / 127.5 - 1
    return (x - torch.tensor(VIDEO_MEAN)[:, None, None]) / torch.tensor(VIDEO_STD)[:, None, None]


@pytest.mark.parametrize("family", sorted(VIDEO_MODELS))
def test_eval_video_models_on_a_video_folder(request, family, video_folder, tmp_path, capsys):
    fixture, tokens, _ = VIDEO_MODELS[family]
    model_dir = request.getfixturevalue(fixture)
    assert _eval(model_dir, video_folder, tmp_path / "out") == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["method"], r["schedule"]) for r in rows] == [
        ("none", "-"), ("tome", "2"), ("tome", "4"), ("drop", "2"), ("drop", "4")]
    assert all(r["num_images"] == 6 and r["speedup"] > 0 and r["gflops"] > 0 for r in rows)
    assert rows[1]["tokens_in"] == tokens and rows[2]["tokens_out"] == tokens - 2 * 4
    assert rows[2]["gflops"] < rows[0]["gflops"]
    assert "6 clips, 3 classes" in capsys.readouterr().out
    # The loaded clips and the unmodified row against a computation without tokenmerge's data
    # loading, with the saved (non-default) statistics: another normalisation fails here.
    model = load_model(f"hf:{model_dir}")
    clips = torch.stack([_reference_clip(path, family) for path, _ in _files(video_folder)])
    labels = [label for _, label in _files(video_folder)]
    torch.testing.assert_close(inputs_for(model).load(video_folder)[0], clips, rtol=1e-4, atol=1e-4)
    assert rows[0]["accuracy"] == pytest.approx(_accuracy(model.eval(), clips, labels))
    # A rerun reads every row from the cache (the key includes the input settings).
    assert _eval(model_dir, video_folder, tmp_path / "out", "--no-timing") == 0
    assert all(r["cached"] for r in json.loads((tmp_path / "out" / "results.json").read_text())["rows"])


@pytest.mark.parametrize("family,saved", [("videomae", True), ("vivit", True), ("vivit", False)])
def test_video_pixels_are_normalised_as_the_hugging_face_processor_does(request, family, saved, tmp_path):
    """The statistics tokenmerge applies to [0, 1] pixels against the model's own Hugging Face
    image processor (rescale + normalise, frames already at size): the saved settings, and
    without preprocessor_config.json ViViT's defaults (x / 127.5 - 1, then mean/std 0.5)."""
    fixture, _, processor_class = VIDEO_MODELS[family]
    folder = request.getfixturevalue(fixture)
    if not saved:  # the same model without its preprocessor_config.json
        folder = tmp_path / "plain"
        load_model(f"hf:{request.getfixturevalue(fixture)}").save_pretrained(folder)
    processor = getattr(transformers, processor_class)
    processor = processor.from_pretrained(folder) if saved else processor()
    frames = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    expected = processor(list(frames), do_resize=False, do_center_crop=False, return_tensors="pt").pixel_values[0]
    inputs = inputs_for(load_model(f"hf:{folder}"))
    mean, std = (torch.tensor(v)[:, None, None] for v in inputs._normalisation())
    pixels = torch.from_numpy(frames).permute(0, 3, 1, 2) / 255
    torch.testing.assert_close((pixels - mean) / std, expected, rtol=1e-5, atol=1e-5)
    # Frame count and size from the model's config; the shorter side from the processor's
    # size (saved), or its default ratio of resize to crop (256 / 224) at the model's 32.
    assert inputs.shape == (4, 3, 32, 32)
    assert inputs.processor()["resize"] == {"videomae": 32, "vivit": 36 if saved else 37}[family]


def test_eval_ast_on_a_wav_folder_uses_the_saved_feature_settings(ast_dir, wav_folder, tmp_path):
    assert _eval(ast_dir, wav_folder, tmp_path / "out", "--no-timing") == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert len(rows) == 5 and rows[1]["tokens_in"] == 10
    model = transformers.ASTForAudioClassification.from_pretrained(ast_dir).eval()
    features, labels = [], []
    for path, label in _files(wav_folder):
        features.append(log_mel(load_wav(path)[0], RATE, 32, num_frames=48, mean=AUDIO_MEAN, std=AUDIO_STD))
        labels.append(label)
    assert rows[0]["accuracy"] == pytest.approx(_accuracy(model, torch.stack(features), labels))
    inputs = inputs_for(load_model(f"hf:{ast_dir}"))
    assert inputs.kind == "spectrograms" and inputs.shape == (48, 32)
    assert inputs.cache_context()["mean"] == AUDIO_MEAN


def test_bench_times_video_and_audio_models(videomae_dir, vivit_dir, ast_dir, capsys):
    for folder, shape in ((videomae_dir, [4, 3, 32, 32]), (vivit_dir, [4, 3, 32, 32]), (ast_dir, [48, 32])):
        assert main(["bench", f"hf:{folder}", "--r", "2", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                     "--device", "cpu", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["input_shape"] == shape and result["image_size"] is None and result["batch_size"] == 2
        assert [row["variant"] for row in result["rows"]] == ["unmodified", "tome 2", "drop 2"]
    assert main(["bench", f"hf:{videomae_dir}", "--r", "2", "--repeats", "1", "--image-size", "64"]) == 2
    assert "--image-size applies to image models; this model takes videos 4x3x32x32" in capsys.readouterr().err


def test_corrupt_and_short_files_are_named(videomae_dir, ast_dir, video_folder, wav_folder, tmp_path, capsys):
    import shutil

    videos = shutil.copytree(video_folder, tmp_path / "videos")
    (videos / "b" / "1.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    assert _eval(videomae_dir, videos, tmp_path / "o1", "--no-timing") == 2
    err = capsys.readouterr().err
    assert f"{videos / 'b' / '1.mp4'} is not a readable video file" in err and "re-encode it" in err
    write_video(videos / "b" / "1.mp4", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    assert _eval(videomae_dir, videos, tmp_path / "o2", "--no-timing") == 2
    assert (f"{videos / 'b' / '1.mp4'} has 3 frames, the model takes 4 (num_frames in its config.json); use clips "
            "of at least 4 frames") in capsys.readouterr().err

    wavs = shutil.copytree(wav_folder, tmp_path / "wavs")
    (wavs / "mid" / "0.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    assert _eval(ast_dir, wavs, tmp_path / "o3", "--no-timing") == 2
    assert f"{wavs / 'mid' / '0.wav'} is not a readable audio file" in capsys.readouterr().err


def test_media_models_say_what_data_they_need(videomae_dir, ast_dir, wav_folder, tmp_path, capsys):
    assert main(["eval", f"hf:{videomae_dir}", "--out", str(tmp_path / "o")]) == 2
    assert "takes videos: pass --data, a folder with one sub-folder per class holding video" in capsys.readouterr().err
    # A WAV folder given to a video model: no video files in it.
    assert _eval(videomae_dir, wav_folder, tmp_path / "o") == 2
    assert "has class sub-folders but no .mp4/.mkv" in capsys.readouterr().err
    assert _eval(ast_dir, wav_folder, tmp_path / "o", "--target-speedup", "1.5") == 2
    assert "--target-speedup/--target-gflops search image models only; this model takes spectrograms" in (
        capsys.readouterr().err)


def test_read_video_round_trip_and_prepare_clip(tmp_path):
    frames = np.zeros((5, 16, 24, 3), dtype=np.uint8)
    frames[:, :, :12] = 200  # left half bright: survives H.264 up to small errors
    write_video(tmp_path / "c.mkv", frames)
    decoded = read_video(tmp_path / "c.mkv")
    assert decoded.shape == (5, 16, 24, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    clip = prepare_clip(decoded, 2, 16, mean=(0, 0, 0), std=(1, 1, 1))
    assert clip.shape == (2, 3, 16, 16)  # centre crop of the 16x24 frame: columns 4..19
    assert clip[..., :8].mean() > 0.7 and clip[..., 8:].mean() < 0.1
    with pytest.raises(ValueError, match="even frame size"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="nothere.mp4"):
        read_video(tmp_path / "nothere.mp4")


def _png_size(path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_visualize_ast_on_a_wav(ast_dir, wav_folder, tmp_path, capsys):
    out = tmp_path / "ast.png"
    assert main(["visualize", str(wav_folder / "low" / "0.wav"), f"hf:{ast_dir}", "--r", "2", "--out", str(out)]) == 0
    assert "after block 2/2, 10 tokens -> 6" in capsys.readouterr().out
    assert _png_size(out) == (924, 616)  # 8.4 x 5.6 inches at 110 dpi: spectrogram above groups


@pytest.mark.parametrize("family", sorted(VIDEO_MODELS))
def test_visualize_a_clip_as_a_png_and_an_animated_gif(request, family, video_folder, tmp_path, capsys):
    from PIL import Image

    fixture, tokens, _ = VIDEO_MODELS[family]
    model = f"hf:{request.getfixturevalue(fixture)}"
    clip = str(video_folder / "a" / "0.mp4")
    out = tmp_path / "video.png"
    assert main(["visualize", clip, model, "--r", "4", "--block", "1", "--out", str(out)]) == 0
    assert f"after block 1/2, {tokens} tokens -> {tokens - 4}" in capsys.readouterr().out
    assert _png_size(out) == (550, 528)  # 2 tubelet steps: (0.6 + 2 x 2.2) x 4.8 inches
    out = tmp_path / "video.GIF"
    assert main(["visualize", clip, model, "--r", "4", "--out", str(out)]) == 0
    assert f"after block 2/2, {tokens} tokens -> {tokens - 8}; wrote {out}" in capsys.readouterr().out
    with Image.open(out) as gif:
        # One picture per frame the model takes (4 of the clip's 6): the 32x32 frame and its
        # groups, each enlarged 7x to 224, 8 pixels apart, under a 20-pixel caption.
        assert gif.format == "GIF" and gif.n_frames == 4 and gif.info["loop"] == 0
        assert gif.size == (2 * 224 + 8, 20 + 224)
        gif.seek(3)
        picture = np.asarray(gif.convert("RGB"), dtype=np.int64)
    # Frame 4 lies in tubelet step 1; its groups panel (right) is filled with group means and
    # outlined, so it has far fewer colours than the frame beside it (left, random pixels).
    left, right = picture[20:, :224], picture[20:, 232:]
    colours = [len(np.unique(p.reshape(-1, 3), axis=0)) for p in (left, right)]
    assert colours[1] < tokens < colours[0]


def test_group_maps_of_audio_and_video_cover_every_patch_once(ast_dir, videomae_dir, vivit_dir, wav_folder,
                                                              video_folder):
    import tokenmerge
    from tokenmerge.backends.adapter import adapter_for
    from tokenmerge.evaluation.visualize import merge_groups, spectrogram_cells

    for folder, file, grid in ((ast_dir, wav_folder / "mid" / "1.wav", (2, 4)),
                               (videomae_dir, video_folder / "c" / "1.mp4", (2, 4, 4)),
                               (vivit_dir, video_folder / "c" / "1.mp4", (2, 4, 4))):
        patched = tokenmerge.patch(load_model(f"hf:{folder}"), method="tome", r=2)
        x = inputs_for(patched).load_file(file)
        groups = merge_groups(patched, x)
        protected = adapter_for(patched).config.num_protected
        assert groups.source.shape == grid  # one token id per patch / tubelet
        assert groups.num_tokens == adapter_for(patched).tokens_per_block()[-1] < math.prod(grid)
        assert groups.source.unique().numel() == groups.num_tokens - protected
        assert groups.source.min() >= protected and groups.source.max() < groups.num_tokens
        # The same as the traced model's own forward, in token order.
        traced = tokenmerge.patch(load_model(f"hf:{folder}"), method="tome", r=2, trace_source=True)
        with torch.inference_mode():
            state, _ = adapter_for(traced).final_state(x.unsqueeze(0))
        assert torch.equal(groups.source.reshape(-1), state.source[0])
        with torch.inference_mode():  # dense maps use the same grid: AST's is (frequency, time) with strides
            assert tokenmerge.dense_features(traced, x.unsqueeze(0), output="map").shape == (1, 32, *grid)
    # AST: 32 mel bins x 48 frames, 16x16 patches every 10: each cell goes to the nearest
    # patch centre, so every patch keeps a tile and covers its own centre.
    adapter = adapter_for(tokenmerge.patch(load_model(f"hf:{ast_dir}"), method="tome", r=2))
    assert adapter.spectrogram_strides == (10, 10) and adapter.patch_size == (16, 16)
    patches = np.arange(8).reshape(2, 4)
    cells = spectrogram_cells(patches, 32, 48, (16, 16), (10, 10))
    assert cells.shape == (32, 48) and sorted(np.unique(cells)) == list(range(8))
    for i in range(2):
        for j in range(4):
            assert cells[10 * i + 8, 10 * j + 8] == patches[i, j]
    assert cells[12, 0] == 0 and cells[13, 0] == 4 and cells[0, 12] == 0 and cells[0, 13] == 1  # ties go low
    assert (cells[:, 47] == cells[:, 40]).all()  # past the last patch: the last one


def test_visualize_names_bad_files_and_says_what_the_model_takes(ast_dir, videomae_dir, hf_vit_dir, wav_folder,
                                                                   video_folder, tmp_path, capsys):
    out = str(tmp_path / "v.png")
    wav, clip = wav_folder / "low" / "0.wav", video_folder / "a" / "0.mp4"
    cases = [
        (wav, videomae_dir, "0.wav is an audio file but videomae takes videos: pass a video (MP4"),
        (clip, ast_dir, "0.mp4 is a video but audio-spectrogram-transformer takes spectrograms: pass a WAV/FLAC file"),
        (wav, hf_vit_dir, "0.wav is an audio file but vit takes images: pass an image (JPEG, PNG...) file"),
        (tmp_path / "gone.wav", ast_dir, "gone.wav' does not exist"),
    ]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    cases.append((broken, ast_dir, f"{broken} is not a readable audio file"))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    cases.append((broken, videomae_dir, f"{broken} is not a readable video file"))
    for file, folder, message in cases:
        assert main(["visualize", str(file), f"hf:{folder}", "--r", "2", "--out", out]) == 2
        assert message in capsys.readouterr().err


def test_visualize_refuses_short_clips_and_gifs_of_other_inputs(ast_dir, vivit_dir, hf_vit_dir, wav_folder,
                                                                 tiny_image_folder, tmp_path, capsys):
    short = tmp_path / "short.mp4"
    write_video(short, np.zeros((3, 32, 32, 3), dtype=np.uint8))
    image = next(p for p in sorted(tiny_image_folder.rglob("*")) if p.is_file())
    cases = [
        (short, vivit_dir, "v.gif", f"{short} has 3 frames, the model takes 4 (num_frames in its config.json); "
                                    "use clips of at least 4 frames"),
        (image, hf_vit_dir, "v.gif", "an animated GIF shows a video's frames, but vit takes images: write a PNG "
                                     "instead (--out NAME.png)"),
        (wav_folder / "low" / "0.wav", ast_dir, "v.gif", "but audio-spectrogram-transformer takes spectrograms: "
                                                         "write a PNG instead"),
    ]
    for file, folder, name, message in cases:
        assert main(["visualize", str(file), f"hf:{folder}", "--r", "2", "--out", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("setting,message", [
    ({"crop_size": {"height": 48, "width": 48}},
     "preprocessor_config.json says crop_size={'height': 48, 'width': 48} but the model's config.json says "
     "image_size=32; make them agree"),
    ({"size": {"height": 36, "width": 40}},
     "size={'height': 36, 'width': 40} is not a size tokenmerge reads"),
    ({"size": {"shortest_edge": 24}}, "set size.shortest_edge >= 32 in preprocessor_config.json"),
    ({"image_std": [0.5, 0.5]}, "image_std=[0.5, 0.5] must be a number or 3 numbers (RGB)"),
    ({"offset": True, "do_rescale": False}, "sets offset without do_rescale"),
])
def test_a_video_preprocessor_config_the_model_cannot_use_is_named(vivit_dir, video_folder, setting, message,
                                                                      tmp_path, capsys):
    import shutil

    folder = shutil.copytree(vivit_dir, tmp_path / "model")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(config, **setting)))
    assert _eval(folder, video_folder, tmp_path / "out", "--no-timing") == 2
    assert message in capsys.readouterr().err
