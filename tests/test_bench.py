import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.cli import main
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.throughput import measure_throughput, time_interleaved


def analytic_gflops(tokens_per_block, dim, depth, patches, patch_size, classes, head_dim, mlp_ratio=4):
    """2 FLOPs per multiply-add: patch embedding, qkv/proj/MLP, attention, matching, head."""
    flops = 2 * patches * (3 * patch_size ** 2) * dim
    for n_in, n_out in zip(tokens_per_block[:depth], tokens_per_block[1:]):
        if n_out < n_in:  # ToMe's A x B similarity (A: even indices from 2, B: odd, class token out)
            flops += 2 * len(range(2, n_in, 2)) * len(range(1, n_in, 2)) * head_dim
        flops += 2 * n_in * dim * 3 * dim  # qkv
        flops += 2 * 2 * n_in * n_in * dim  # q k^T and attn v
        flops += 2 * n_in * dim * dim  # proj
        flops += 2 * 2 * n_out * dim * mlp_ratio * dim  # MLP after merging
    return (flops + 2 * dim * classes) / 1e9


@pytest.mark.parametrize("r", [0, 3])
def test_gflops_match_the_closed_form(r):
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
    tokenmerge.patch(model, r=r)
    expected = analytic_gflops(model.tokens_per_block(), 32, 3, 16, 8, 5, head_dim=16)
    assert count_gflops(model, image_size=32) == pytest.approx(expected, rel=1e-9)


def test_measure_throughput_reports_every_model():
    models = {"a": torch.nn.Flatten(), "b": torch.nn.Identity()}
    result = measure_throughput(models, batch_size=2, image_size=8, warmup=1, repeats=3)
    assert set(result) == {"a", "b"}
    assert all(len(r["times_s"]) == 3 and r["images_per_s"] > 0 for r in result.values())


def test_time_interleaved_calls_in_rounds_and_drops_the_warm_up():
    order = []
    calls = {"a": lambda: order.append("a"), ("b", 1): lambda: order.append("b")}
    times = time_interleaved(calls, warmup=2, repeats=3)
    assert order == ["a", "b"] * 5  # every round calls each entry once, in turn
    assert list(times) == ["a", ("b", 1)]
    assert all(len(t) == 3 and min(t) >= 0 for t in times.values())


def test_bench_cli_json(capsys):
    code = main(["bench", "vit_tiny_patch16_224", "--r", "13", "4:-1", "--batch-size", "2",
                 "--warmup", "1", "--repeats", "2", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["unmodified", "tome 13", "drop 13", "tome 4:-1", "drop 4:-1"]
    assert rows["unmodified"]["speedup"] == 1.0
    assert rows["tome 13"]["tokens_per_block"][-1] == 197 - 12 * 13
    assert rows["drop 13"]["tokens_per_block"] == rows["tome 13"]["tokens_per_block"]
    assert rows["tome 4:-1"]["tokens_per_block"][:2] == [197, 189]
    assert rows["tome 13"]["gflops"] < 0.6 * rows["unmodified"]["gflops"]
    # the same token counts; ToMe adds only its similarity matmuls
    assert rows["drop 13"]["gflops"] < rows["tome 13"]["gflops"] < 1.01 * rows["drop 13"]["gflops"]
    assert "fraction_of_bound" in rows["tome 13"] and "fraction_of_bound" not in rows["drop 13"]


def test_bench_cli_table_and_errors(capsys):
    assert main(["bench", "vit_tiny_patch16_224", "--r", "2", "--batch-size", "1", "--warmup", "0",
                 "--repeats", "1", "--no-bound"]) == 0
    out = capsys.readouterr().out
    assert "unmodified" in out and "tome 2" in out and "drop" not in out
    assert main(["bench", "not_a_model", "--repeats", "1"]) == 2
    assert "unknown timm model 'not_a_model'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "vit_tiny_patch16_224", "--r", "-3"])
    assert main(["bench", "resnet18", "--repeats", "1"]) == 2
    assert "cannot patch timm.models.resnet.ResNet" in capsys.readouterr().err
    assert main(["bench", "vit_tiny_patch16_224", "--image-size", "100", "--repeats", "1"]) == 2
    assert "built for 224x224 images" in capsys.readouterr().err


def test_bench_cli_on_a_hugging_face_folder(hf_vit_dir, capsys):
    model = f"hf:{hf_vit_dir}"
    code = main(["bench", model, "--r", "2", "--batch-size", "2", "--warmup", "0", "--repeats", "1",
                 "--threads", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["unmodified", "tome 2", "drop 2"]
    assert result["image_size"] == 32 and result["model"] == model
    assert rows["tome 2"]["tokens_per_block"] == rows["drop 2"]["tokens_per_block"] == [17, 15, 13]
    assert rows["drop 2"]["gflops"] < rows["tome 2"]["gflops"] < rows["unmodified"]["gflops"]
    assert main(["bench", model, "--image-size", "48", "--repeats", "1"]) == 2
    assert "built for 32x32 images" in capsys.readouterr().err
