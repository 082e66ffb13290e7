"""tokenmerge visualize: source maps at the last or a chosen block, the group drawing, the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tokenmerge
from tokenmerge.api import shared_copy
from tokenmerge.cli import main
from tokenmerge.evaluation.visualize import fill_groups, group_image, load_display_image, merge_groups
from tokenmerge.models import load_model

SUBSET = Path(tokenmerge.__file__).parent / "assets" / "imagenette_val_subset"
IMAGE = sorted((SUBSET / "n01440764").iterdir())[0]


@pytest.fixture(scope="module")
def tome13():
    return tokenmerge.patch(load_model(), method="tome", r=13)


@pytest.fixture(scope="module")
def image():
    return load_display_image(IMAGE)[1]


def test_display_image_is_the_evaluation_input_before_normalisation(tiny_image_folder, tmp_path):
    from PIL import Image

    from tokenmerge.evaluation.data import IMAGENET_MEAN, IMAGENET_STD, image_transform

    # A non-square, larger image, so that the resize and the centre crop both act.
    wide = tmp_path / "wide.png"
    Image.open(tiny_image_folder / "class1" / "2.png").convert("RGB").resize((48, 40)).save(wide)
    display, normalised = load_display_image(wide, image_size=32)
    expected = image_transform(32)(Image.open(wide).convert("RGB"))
    assert torch.equal(normalised, expected)
    assert display.shape == (32, 32, 3) and 0.0 <= display.min() and display.max() <= 1.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(torch.from_numpy(display).permute(2, 0, 1) - mean, expected * std, atol=1e-6)


def test_groups_after_last_block_match_forward_tokens(tome13, image):
    groups = merge_groups(tome13, image)
    assert groups.block == 12 and groups.tokens_in == 197
    assert groups.num_tokens == tome13.tokens_per_block()[-1] == 197 - 12 * 13
    # Independently: the same model patched with source tracking, one plain forward.
    traced = tokenmerge.patch(load_model(), method="tome", r=13, trace_source=True)
    with torch.inference_mode():
        state = traced.forward_tokens(image.unsqueeze(0))
    assert torch.equal(groups.source.reshape(-1), state.source[0])
    # ToMe never discards: every non-class token covers at least one patch.
    assert sorted(groups.source.unique().tolist()) == list(range(1, groups.num_tokens))
    assert not tome13.tokenmerge_config.trace_source  # the caller's model is left alone


@pytest.mark.parametrize("block", [1, 4, 9])
def test_groups_at_a_chosen_block(tome13, image, block):
    groups = merge_groups(tome13, image, block=block)
    assert groups.num_tokens == tome13.tokens_per_block()[block]
    assert groups.source.unique().numel() == groups.num_tokens - 1


def test_bad_block(tome13, image):
    with pytest.raises(ValueError, match=r"1\.\.12"):
        merge_groups(tome13, image, block=13)
    with pytest.raises(ValueError, match="not patched"):
        merge_groups(load_model(), image)


def test_group_image_fills_mean_colours_and_draws_borders():
    image = np.zeros((4, 4, 3), dtype=np.float32)
    image[:2, :2] = [1.0, 0.0, 0.0]  # patch (0,0) red
    image[:2, 2:] = [0.0, 0.0, 1.0]  # patch (0,1) blue
    image[2:, :] = [0.0, 1.0, 0.0]   # bottom row green
    source = np.array([[1, 1], [2, 3]])  # top patches merged; bottom-right discarded (3 >= 3 tokens)
    out = group_image(image, source, num_tokens=3, border=(9, 9, 9), discarded=(7, 7, 7))
    assert np.allclose(out[0, 0], [0.5, 0.0, 0.5])            # mean of red and blue
    assert np.allclose(out[0, 3], [0.5, 0.0, 0.5])
    assert np.allclose(out[1, 1], [9, 9, 9])                  # lower edge of the top group
    assert np.allclose(out[3, 0], [0.0, 1.0, 0.0])            # bottom-left group, one patch
    assert np.allclose(out[2, 1], [9, 9, 9])                  # border to the discarded patch
    assert np.allclose(out[3, 3], [7, 7, 7])                  # discarded
    with pytest.raises(ValueError, match="patches"):
        group_image(np.zeros((5, 4, 3)), source, 3)


def test_visualize_cli(tmp_path, capsys):
    out = tmp_path / "v.png"
    assert main(["visualize", str(IMAGE), "--r", "16", "--block", "6", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"after block 6/12, 197 tokens -> {197 - 6 * 16}" in capsys.readouterr().out
    assert main(["visualize", str(tmp_path / "missing.jpg"), "--out", str(out)]) == 2
    assert "missing.jpg" in capsys.readouterr().err


def test_visualize_cli_on_a_hugging_face_folder(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "hf.png"
    image = tiny_image_folder / "class0" / "0.png"
    assert main(["visualize", str(image), f"hf:{hf_vit_dir}", "--r", "3", "--block", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "after block 1/2, 17 tokens -> 14" in capsys.readouterr().out



def test_visualize_writes_the_format_the_suffix_names(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    from PIL import Image

    from tokenmerge.commands.visualize import render

    image = tiny_image_folder / "class0" / "0.png"
    out = tmp_path / "groups.jpg"
    assert main(["visualize", str(image), f"hf:{hf_vit_dir}", "--r", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    with Image.open(out) as written:
        assert written.format == "JPEG"
    capsys.readouterr()
    # A suffix naming no format we write is refused before the model loads, and nothing is written.
    for name, problem in (("groups.bmp", ".bmp is not an image format tokenmerge visualize writes"),
                          ("groups", "the name has no suffix to say which image format to write")):
        with pytest.raises(SystemExit):
            main(["visualize", str(image), f"hf:{hf_vit_dir}", "--out", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert f"argument --out: cannot write {str(tmp_path / name)!r}: {problem}; end the name in .png" in err
        assert not (tmp_path / name).exists()
    with pytest.raises(ValueError, match=r"\.bmp is not an image format"):
        render(load_model(f"hf:{hf_vit_dir}"), image, "tome", 3, tmp_path / "api.bmp")
    assert not (tmp_path / "api.bmp").exists()


def test_an_unreadable_image_gets_the_remedy_of_where_it_came_from(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    from tokenmerge.evaluation.data import image_folder

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    # One file named on the command line: no dataset folder to remove it from.
    assert main(["visualize", str(bad), f"hf:{hf_vit_dir}", "--out", str(tmp_path / "v.png")]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not a readable image" in err and "pass an image file that PIL can open" in err
    assert "dataset folder" not in err
    # A file of a dataset folder keeps the folder's remedy.
    folder = tmp_path / "data"
    shutil.copytree(tiny_image_folder, folder)
    shutil.copy(bad, folder / "class0" / "bad.jpg")
    dataset = image_folder(folder, image_size=32)
    index = [Path(path).name for path, _ in dataset.samples].index("bad.jpg")
    with pytest.raises(ValueError, match="bad.jpg is not a readable image .*; remove it from the dataset folder"):
        dataset[index]


def test_groups_of_a_hugging_face_model_match_its_traced_forward(hf_vit_dir, tiny_image_folder):
    from tokenmerge.backends.adapter import adapter_for

    image = load_display_image(tiny_image_folder / "class1" / "2.png", image_size=32)[1]
    patched = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), method="tome", r=3)
    groups = merge_groups(patched, image)
    assert groups.block == 2 and groups.tokens_in == 17 and groups.num_tokens == 17 - 2 * 3
    traced = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), method="tome", r=3, trace_source=True)
    with torch.inference_mode():
        state, _ = adapter_for(traced).final_state(image.unsqueeze(0))
    assert torch.equal(groups.source.reshape(-1), state.source[0])
    assert groups.source.shape == (4, 4)


def test_fill_groups_gives_a_token_one_colour_in_every_panel():
    # Two video panels (tubelet steps) of 2x2 patches of 2x2 pixels; token 0 merged the
    # top-left patch of both steps, the other tokens lie in one step each.
    source = np.array([[[0, 1], [1, 2]], [[0, 3], [3, 3]]])
    pixels = np.repeat(np.repeat(source, 2, axis=1), 2, axis=2)
    frames = np.zeros((2, 4, 4, 3), dtype=np.float32)
    frames[0, :2, :2] = [1.0, 0.0, 0.0]  # red in step 0
    frames[1, :2, :2] = [0.0, 0.0, 1.0]  # blue in step 1
    frames[0, 2:, 2:] = [0.0, 1.0, 0.0]
    out = fill_groups(frames, pixels, num_tokens=4, border=(9, 9, 9))
    assert np.allclose(out[0, 0, 0], [0.5, 0.0, 0.5]) and np.allclose(out[1, 0, 0], [0.5, 0.0, 0.5])
    assert np.allclose(out[0, 3, 3], [0.0, 1.0, 0.0])  # token 2, one patch
    assert np.allclose(out[0, 0, 1], [9, 9, 9])  # token 0 meets token 1 on its right
    # Borders are drawn within a panel: the last row of step 0 is not compared with step 1.
    assert np.allclose(out[0, 3, 0], out[0, 2, 2 - 2]) and not np.allclose(out[0, 3, 0], [9, 9, 9])
    with pytest.raises(ValueError, match="does not match"):
        fill_groups(frames, pixels[:, :1], num_tokens=4)


def _tiny_timm_vit(img_size=64, depth=3, **kwargs):
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=img_size, depth=depth, num_classes=5, **kwargs).eval()


def _own_source(model, image):
    """The source map of the model's own traced forward (a traced copy: the model is left alone)."""
    from tokenmerge.backends.adapter import adapter_for

    adapter = adapter_for(model)
    config = adapter.config
    traced = tokenmerge.patch(
        shared_copy(model), method=adapter_for(model).reducer, r=config.schedule, trace_source=True,
        num_protected=config.num_protected, prop_attn=config.prop_attn, mlp_share=config.mlp_share,
        attention_impl=config.attention_impl, layout=config.layout,
    )
    with torch.inference_mode():
        state, _ = adapter_for(traced).final_state(image.unsqueeze(0))
    return state


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("options", [dict(mlp_share=0.5), dict(prop_attn=False)])
def test_groups_are_the_ones_the_model_forms_under_every_option(options):
    model = tokenmerge.patch(_tiny_timm_vit(img_size=96, depth=6), method="tome", r=5, **options)
    # Several images: with random weights an option changes some images' groups, not all.
    for seed in range(3):
        image = torch.randn(3, 96, 96, generator=torch.Generator().manual_seed(seed))
        groups = merge_groups(model, image)
        state = _own_source(model, image)
        assert groups.num_tokens == state.x.shape[1]
        assert torch.equal(groups.source.reshape(-1), state.source[0])


@pytest.mark.usefixtures("one_thread")
def test_local_layout_has_no_lasting_groups_and_is_refused():
    model = tokenmerge.patch(_tiny_timm_vit(), method="tome", r=4, layout="local")
    with pytest.raises(ValueError, match="layout='local'.*puts each one back.*patch with layout='global'"):
        merge_groups(model, torch.randn(3, 64, 64))


def _open_clip_attention_pool_tower():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=16, width=32, layers=3, heads=2, mlp_ratio=2, output_dim=16,
                             attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=4).eval()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("make", [lambda: _tiny_timm_vit(global_pool="map"), _open_clip_attention_pool_tower],
                         ids=["timm-map", "open_clip-attn-pool"])
def test_groups_when_the_class_token_may_merge(make):
    # An attention-pool head reads every token, so patch() lets the class token merge.
    model = tokenmerge.patch(make(), method="tome", r=4, num_protected=0)
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))
    groups = merge_groups(model, image)
    state = _own_source(model, image)
    assert groups.source.shape == (4, 4) and groups.num_tokens == state.x.shape[1]
    assert torch.equal(groups.source.reshape(-1), state.source[0, 1:])  # the class token's entry is no patch


@pytest.mark.usefixtures("one_thread")
def test_groups_of_a_bfloat16_model():
    model = tokenmerge.patch(_tiny_timm_vit().to(torch.bfloat16), method="tome", r=4)
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))  # float32, as images load
    groups = merge_groups(model, image)
    state = _own_source(model, image.to(torch.bfloat16))
    assert torch.equal(groups.source.reshape(-1), state.source[0])


@pytest.mark.usefixtures("one_thread")
def test_an_image_size_that_leaves_pixels_past_the_last_patch(tiny_image_folder):
    from tokenmerge.evaluation.visualize import visualize_merging

    # 56 pixels: three 16-pixel patches a side, the last 8 rows and columns dropped by the patch embedding.
    model = tokenmerge.patch(_tiny_timm_vit(img_size=56, depth=2), method="tome", r=2)
    figure, groups = visualize_merging(model, tiny_image_folder / "class0" / "0.png")
    assert groups.source.shape == (3, 3) and len(figure.axes) == 2
    # 2x2 patches of 2x2 pixels in a 5x5 image: the fifth row and column join the last patches.
    image = np.zeros((5, 5, 3), dtype=np.float32)
    image[2:4, 2:4] = 1.0  # patch (1, 1), token 3; its extra pixels are black
    out = group_image(image, np.array([[0, 1], [2, 3]]), num_tokens=4, border=(9, 9, 9), patch_size=(2, 2))
    assert np.allclose(out[4, 4], 4 / 9) and np.allclose(out[3, 3], 4 / 9)  # one group of 9 pixels
    assert np.allclose(out[4, 1], [9, 9, 9]) and np.allclose(out[4, 0], 0.0)  # token 2 runs to the bottom
    with pytest.raises(ValueError, match="smaller than its 2x2 patches of 4x4 pixels"):
        group_image(image, np.array([[0, 1], [2, 3]]), 4, patch_size=(4, 4))
