"""tokenmerge eval: accuracy against an independent computation, the resumable cache,
the Pareto plot, clear errors. Real checkpoint, real Imagenette images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tokenmerge
from tokenmerge.core.matching import bipartite_max_reduction
from tokenmerge.core.schedule import resolve_schedule
from tokenmerge.cli import main
from tokenmerge.evaluation import sweep
from tokenmerge.evaluation.pareto import pareto_figure, save_pareto_plot
from tokenmerge.models import DEFAULT_CHECKPOINT

SHARED_VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "val"
SUBSET = Path(tokenmerge.__file__).parent / "assets" / "imagenette_val_subset"
PER_CLASS = 4  # 40 images, all 10 classes
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory) -> Path:
    """The first PER_CLASS original val images of every class, as an ImageFolder of symlinks.

    Needs ../shared: fails (never skips) without it.
    """
    assert SHARED_VAL.is_dir(), f"the Imagenette val set is missing at {SHARED_VAL}: these tests need ../shared/data"
    root = tmp_path_factory.mktemp("val_subset")
    for folder in sorted(p for p in SHARED_VAL.iterdir() if p.is_dir()):
        (root / folder.name).mkdir()
        for image in sorted(folder.iterdir())[:PER_CLASS]:
            (root / folder.name / image.name).symlink_to(image)
    return root


def independent_predictions(root: Path, model: torch.nn.Module) -> tuple:
    """Predictions and labels by a plain loop: torchvision ImageFolder, timm, no tokenmerge data code."""
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    predictions, labels = [], []
    with torch.inference_mode():
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=20):
            predictions.append(model(x).argmax(-1))
            labels.append(y)
    return torch.cat(predictions), torch.cat(labels)


def plain_timm_model():
    import timm
    from safetensors.torch import load_file

    model = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    model.load_state_dict({k: v.float() for k, v in load_file(str(DEFAULT_CHECKPOINT)).items()})
    return model.eval()


@pytest.fixture(scope="module")
def eval_run(val_subset, tmp_path_factory):
    """One real `tokenmerge eval` through the CLI: unmodified, ToMe r=13 and 13:-1, timed."""
    out = tmp_path_factory.mktemp("eval_out")
    code = main(["eval", "--data", str(val_subset), "--methods", "tome", "--r", "13", "13:-1",
                 "--out", str(out), "--plot", "--timing-batch-size", "4", "--warmup", "1",
                 "--repeats", "2"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_unmodified_accuracy_matches_independent_loop(eval_run, val_subset):
    _, results = eval_run
    rows = {(r["method"], r["schedule"]): r for r in results["rows"]}
    predictions, labels = independent_predictions(val_subset, plain_timm_model())
    expected = 100.0 * (predictions == labels).double().mean().item()
    assert rows[("none", "-")]["accuracy"] == pytest.approx(expected, abs=1e-9)
    assert rows[("none", "-")]["num_images"] == 10 * PER_CLASS
    # The merged row too: tokenmerge.patch on the plain timm model, same independent loop.
    merged = tokenmerge.patch(plain_timm_model(), method="tome", r=13)
    predictions, labels = independent_predictions(val_subset, merged)
    assert rows[("tome", "13")]["accuracy"] == pytest.approx(
        100.0 * (predictions == labels).double().mean().item(), abs=1e-9)


def test_rows_carry_per_image_results_and_the_paired_difference(val_subset, eval_run):
    from tokenmerge.evaluation.statistics import accuracy_standard_error, unpack_correct

    _, results = eval_run
    rows = {(r["method"], r["schedule"]): r for r in results["rows"]}
    base, r13 = rows[("none", "-")], rows[("tome", "13")]
    merged = tokenmerge.patch(plain_timm_model(), method="tome", r=13)
    predictions, labels = independent_predictions(val_subset, merged)
    assert torch.equal(unpack_correct(r13["correct"], r13["num_images"]), predictions == labels)
    # The paired difference, from the two rows' per-image results by hand.
    d = (unpack_correct(r13["correct"], 10 * PER_CLASS).double()
         - unpack_correct(base["correct"], 10 * PER_CLASS).double())
    assert r13["delta"] == pytest.approx(r13["accuracy"] - base["accuracy"])
    assert r13["delta_se"] == pytest.approx(100 * d.std().item() / len(d) ** 0.5)
    assert base["delta"] is None and base["accuracy_se"] == accuracy_standard_error(base["accuracy"], len(d))
    table = sweep.format_rows(results["rows"])
    assert f"{r13['delta']:+.2f} +- " in table and "vs unmodified (95% CI)" in table


def test_rows_have_flops_tokens_and_same_run_speedup(eval_run):
    out, results = eval_run
    rows = {(r["method"], r["schedule"]): r for r in results["rows"]}
    base, r13, decreasing = rows[("none", "-")], rows[("tome", "13")], rows[("tome", "13:-1")]
    assert base["speedup"] == pytest.approx(1.0)
    assert r13["tokens_in"] == 197 and r13["tokens_out"] == 197 - 12 * 13
    assert r13["gflops"] < 0.75 * base["gflops"]
    assert r13["speedup"] == pytest.approx(r13["images_per_s"] / base["images_per_s"])
    # 13:-1 removes 26 tokens in the first block, decreasing to 0 in the last
    removed = resolve_schedule((13, -1.0), 12, 197, 1, bipartite_max_reduction)
    assert removed[0] == 26 and removed[-1] == 0
    assert decreasing["tokens_out"] == 197 - sum(removed)
    assert decreasing["gflops"] < r13["gflops"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,schedule,options,accuracy,accuracy_se,delta,delta_se,gflops")
    assert len(csv_lines) == 1 + 3
    assert (out / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cache_resumes_after_interruption(val_subset, tmp_path, monkeypatch):
    calls = []
    real = sweep.evaluate_correct

    def counting(*args, **kwargs):
        calls.append(1)
        if interrupt_after is not None and len(calls) > interrupt_after:
            raise KeyboardInterrupt  # killed during the third row
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate_correct", counting)
    argv = ["eval", "--data", str(val_subset), "--limit", "12", "--methods", "tome", "--r", "8", "16",
            "--out", str(tmp_path), "--no-timing"]
    interrupt_after = 2
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 2
    calls.clear()
    interrupt_after = None
    assert main(argv) == 0
    assert len(calls) == 1  # only the row that was interrupted
    first = json.loads((tmp_path / "results.json").read_text())["rows"]
    calls.clear()
    assert main(argv) == 0
    assert calls == []  # everything cached
    second = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["accuracy"] for r in second] == [r["accuracy"] for r in first]
    assert [r["cached"] for r in second] == [True, True, True]
    # A different --limit is different data: nothing may come from the cache.
    calls.clear()
    assert main(argv[:3] + ["--limit", "8"] + argv[5:]) == 0
    assert len(calls) == 3


def test_cache_key_depends_on_options_and_context():
    context = {"weights": "a", "data": "d"}
    a = sweep.Variant.create("tcvit", "13", {"order": 1})
    b = sweep.Variant.create("tcvit", "13", {"order": 2})
    assert sweep.ResultCache.key(context, a) != sweep.ResultCache.key(context, b)
    assert sweep.ResultCache.key(context, a) != sweep.ResultCache.key(dict(context, weights="b"), a)
    assert sweep.ResultCache.key(context, a) == sweep.ResultCache.key(dict(context), sweep.Variant.create("tcvit", 13, {"order": 1}))


def test_pareto_figure_series(eval_run):
    out, results = eval_run
    rows = results["rows"] + [dict(r, method="other", accuracy=r["accuracy"] - 1)
                              for r in results["rows"] if r["method"] == "tome"]
    figure = pareto_figure(rows, title="t")
    assert len(figure.axes) == 2
    for ax, key in zip(figure.axes, ("gflops", "images_per_s")):
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels == ["tome", "other", "unmodified"]
        tome = ax.get_lines()[0]
        expected = sorted((r[key], r["accuracy"]) for r in results["rows"] if r["method"] == "tome")
        assert list(tome.get_xdata()) == pytest.approx([x for x, _ in expected])
        assert list(tome.get_ydata()) == pytest.approx([y for _, y in expected])
        star = ax.get_lines()[2]
        base = next(r for r in rows if r["method"] == "none")
        assert list(star.get_xdata()) == [base[key]] and star.get_marker() == "*"
    path = save_pareto_plot(rows, out / "sub" / "p.png")
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000


def test_plot_from_saved_results(eval_run, tmp_path, capsys):
    out, _ = eval_run
    target = tmp_path / "again.png"
    assert main(["eval", "--from-results", str(out / "results.json"), "--plot", str(target)]) == 0
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert "tome" in capsys.readouterr().out
    assert main(["eval", "--from-results", str(tmp_path / "missing.json")]) == 2


def test_pareto_without_timing_has_one_panel():
    rows = [{"method": "none", "schedule": "-", "accuracy": 85.0, "gflops": 2.5},
            {"method": "tome", "schedule": "8", "accuracy": 84.0, "gflops": 1.8}]
    figure = pareto_figure(rows)
    assert len(figure.axes) == 1
    with pytest.raises(ValueError, match="no results"):
        pareto_figure([])


# --- clear errors: exit code 2 and a message naming the problem ---------------------------

def run_cli(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_data_folder(tmp_path, capsys):
    code, err = run_cli(["eval", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "nope" in err and "does not exist" in err


def test_folder_without_classes(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, err = run_cli(["eval", "--data", str(tmp_path / "data"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "ImageFolder" in err


def test_non_image_file_in_folder(val_subset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(val_subset, data, symlinks=True)
    bad = data / sorted(p.name for p in data.iterdir())[0] / "aaa_notes.jpg"
    bad.write_text("not an image")
    code, err = run_cli(["eval", "--data", str(data), "--out", str(tmp_path / "o"), "--no-timing"], capsys)
    assert code == 2 and "aaa_notes.jpg" in err and "not a readable image" in err


def test_wrong_num_classes_for_checkpoint(tmp_path, capsys):
    code, err = run_cli(["eval", "--checkpoint", str(DEFAULT_CHECKPOINT), "--num-classes", "1000",
                         "--data", str(SUBSET), "--out", str(tmp_path)], capsys)
    assert code == 2 and "--num-classes 10" in err


def test_wrong_num_classes_for_dataset(tmp_path, capsys):
    code, err = run_cli(["eval", "vit_tiny_patch16_224", "--num-classes", "7", "--data", str(SUBSET),
                         "--limit", "4", "--out", str(tmp_path), "--no-timing"], capsys)
    assert code == 2 and "predicts 7 classes" in err and "--num-classes 10" in err


def test_bad_method_and_option(tmp_path, capsys):
    code, err = run_cli(["eval", "--methods", "nosuch", "--out", str(tmp_path)], capsys)
    assert code == 2 and "unknown method 'nosuch'" in err
    code, err = run_cli(["eval", "--methods", "tome", "--method-option", "tcvit.order=2",
                         "--out", str(tmp_path)], capsys)
    assert code == 2 and "tcvit" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--r", "thirteen"])
    assert exit_info.value.code == 2
    assert "cannot parse schedule" in capsys.readouterr().err


def test_parse_option_types():
    assert sweep.parse_option("tcvit.order=2") == ("tcvit", "order", 2)
    assert sweep.parse_option("tau=0.1") == (None, "tau", 0.1)
    assert sweep.parse_option("flag=True") == (None, "flag", True)
    assert sweep.parse_option("init=keys") == (None, "init", "keys")
    assert sweep.parse_option("atc.tau_size=none") == ("atc", "tau_size", None)
    assert sweep.parse_option("tau_size=null") == (None, "tau_size", None)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweep.parse_option("order")


def test_every_variant_is_built_before_images_are_loaded(tmp_path, capsys, monkeypatch):
    from tokenmerge.evaluation import data

    def must_not_load(*args, **kwargs):
        raise AssertionError("images were loaded before every variant was checked")

    monkeypatch.setattr(data, "load_images", must_not_load)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    code, err = run_cli(["eval", "--methods", "tome", "dtem", "--method-option", f"dtem.modules={broken}",
                         "--out", str(tmp_path / "o"), "--no-timing"], capsys)
    assert code == 2 and "broken.safetensors" in err and "cannot be read" in err
    code, err = run_cli(["eval", "--methods", "tome", "tcvit", "--method-option", "tcvit.order=0",
                         "--out", str(tmp_path / "o"), "--no-timing"], capsys)
    assert code == 2 and "order" in err


def test_a_model_tokenmerge_cannot_patch_is_refused_before_the_data(tmp_path, capsys):
    code, err = run_cli(["eval", "resnet18", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)], capsys)
    assert code == 2 and "cannot patch timm.models.resnet.ResNet" in err


# --- a Hugging Face model: tokenmerge eval hf:DIR ---------------------------------------------


def test_eval_on_a_hugging_face_folder(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    from torchvision import datasets, transforms

    from tokenmerge.models import load_model

    out = tmp_path / "out"
    code = main(["eval", f"hf:{hf_vit_dir}", "--data", str(tiny_image_folder), "--methods", "tome",
                 "--r", "2", "--target-speedup", "1.2", "--out", str(out), "--timing-batch-size", "2",
                 "--warmup", "0", "--repeats", "1", "--threads", "1"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    unmodified, tome2, budget = rows
    assert tome2["schedule"] == "2" and (tome2["tokens_in"], tome2["tokens_out"]) == (17, 13)
    assert budget["method"] == "tome" and unmodified["gflops"] / budget["gflops"] >= 1.2
    assert tome2["gflops"] < unmodified["gflops"] and unmodified["speedup"] == 1.0
    # The unmodified accuracy, independently: torchvision at the model's 32x32 input, HF logits.
    transform = transforms.Compose([
        transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    dataset = datasets.ImageFolder(str(tiny_image_folder), transform=transform)
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    with torch.inference_mode():
        predictions = load_model(f"hf:{hf_vit_dir}")(images).logits.argmax(-1)
    assert unmodified["accuracy"] == pytest.approx(100.0 * (predictions == labels).double().mean().item())


def test_eval_config_adds_the_configuration_tune_wrote(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    best = tmp_path / "best.json"
    best.write_text(json.dumps({"method": "mctf", "r": [3, 1], "options": {"prop_attn": False}}))
    out = tmp_path / "out"
    code = main(["eval", f"hf:{hf_vit_dir}", "--data", str(tiny_image_folder), "--methods", "tome",
                 "--r", "2", "--config", str(best), "--out", str(out), "--no-timing", "--threads", "1"])
    assert code == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["method"], row["schedule"]) for row in rows[1:]] == [("tome", "2"), ("mctf", "3,1")]
    assert rows[2]["options"] == {"prop_attn": False} and rows[2]["tokens_out"] == 17 - 4
    best.write_text('{"method": "mctf"}')
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--config", str(best), "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "missing ['r']" in err and str(best) in err


# --- small runs on tiny models: edge cases of the sweep and the command line -------------------


def hf_eval(hf_vit_dir, tiny_image_folder, out, *extra):
    """``tokenmerge eval hf:DIR`` on the tiny ImageFolder, one thread."""
    return main(["eval", f"hf:{hf_vit_dir}", "--data", str(tiny_image_folder), "--out", str(out),
                 "--threads", "1", *extra])


def test_a_single_image_evaluates_without_a_paired_difference(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    """--limit 1 used to crash after every row was computed: one image has no paired standard
    error. The run completes, the difference shown missing everywhere."""
    out = tmp_path / "out"
    assert hf_eval(hf_vit_dir, tiny_image_folder, out, "--limit", "1", "--methods", "tome", "--r", "2",
                   "--timing-batch-size", "2", "--warmup", "0", "--repeats", "1") == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["num_images"] for row in rows] == [1, 1]
    assert [(row["delta"], row["delta_se"]) for row in rows] == [(None, None), (None, None)]
    assert all(row["speedup"] is not None for row in rows)  # timed after the statistics
    csv_rows = (out / "results.csv").read_text().splitlines()
    header = csv_rows[0].split(",")
    for line in csv_rows[1:]:
        cells = dict(zip(header, line.split(",")))
        assert (cells["delta"], cells["delta_se"]) == ("", "")
    table = sweep.format_rows(rows).splitlines()
    column = table[0].index("vs unmodified")
    assert table[3][column:].split()[0] == "-"


def tiny_timm_checkpoint(path: Path) -> tuple:
    """A tiny timm ViT's weights at ``path`` and the --model-kwargs that build it for 3 classes
    at the tiny ImageFolder's 32x32."""
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = VisionTransformer(num_classes=3, **kwargs)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 2.0)  # logits far enough apart for merging to matter
    save_file(model.state_dict(), str(path))
    return kwargs


def test_the_cache_tells_architectures_with_the_same_weights_apart(tiny_image_folder, tmp_path, capsys):
    """The same weights load into another head count (or pooling...): other rows, never the
    cached ones. And a checkpoint is named as such, not as the embedded model."""
    from tokenmerge.commands.eval import _title

    checkpoint = tmp_path / "tiny.safetensors"
    kwargs = tiny_timm_checkpoint(checkpoint)
    out = tmp_path / "out"

    def run(heads):
        argv = ["eval", "vit_tiny_patch16_224", "--checkpoint", str(checkpoint), "--model-kwargs",
                json.dumps(dict(kwargs, num_heads=heads)), "--data", str(tiny_image_folder), "--methods", "tome",
                "--r", "2", "--out", str(out), "--no-timing", "--threads", "1"]
        assert main(argv) == 0
        return json.loads((out / "results.json").read_text()), capsys.readouterr().out

    run(2)
    results, text = run(4)
    assert [row["cached"] for row in results["rows"]] == [False, False]
    assert results["meta"]["model_kwargs"]["num_heads"] == 4
    results, _ = run(4)
    assert [row["cached"] for row in results["rows"]] == [True, True]  # the cache itself still works
    name = "vit_tiny_patch16_224 (checkpoint tiny.safetensors)"
    assert results["meta"]["model"] == name and text.startswith(name)
    assert _title(results["meta"]).startswith(name) and "embedded" not in text


def test_model_description_names_the_embedded_checkpoint_only_without_weights():
    from tokenmerge.cli import build_parser
    from tokenmerge.commands.eval import model_description

    def described(*argv):
        return model_description(build_parser().parse_args(["eval", *argv]))

    assert described() == "vit_tiny_patch16_224 (embedded Imagenette checkpoint)"
    assert described("--checkpoint", "runs/a/vit.safetensors") == "vit_tiny_patch16_224 (checkpoint vit.safetensors)"
    assert described("vit_small_patch16_224", "--pretrained") == "vit_small_patch16_224 (pretrained)"
    assert described("--pretrained") == "vit_tiny_patch16_224 (pretrained)"
    assert described("open_clip:ViT-B-32", "--pretrained", "laion2b_s34b_b79k") == (
        "open_clip:ViT-B-32 (pretrained laion2b_s34b_b79k)")


def test_per_image_rows_do_not_report_the_cap_schedule_as_tokens(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    """ATC with a threshold keeps a number of tokens per image; its cap schedule (17->5 here)
    is not what the images keep, so the row says "per image", in every output alike."""
    out = tmp_path / "out"
    assert hf_eval(hf_vit_dir, tiny_image_folder, out, "--methods", "atc", "--r", "6",
                   "--method-option", "atc.threshold=0.5", "--no-timing") == 0
    row = json.loads((out / "results.json").read_text())["rows"][1]
    assert row["method"] == "atc" and (row["tokens_in"], row["tokens_out"]) == (17, sweep.PER_IMAGE)
    assert ",17,per image," in (out / "results.csv").read_text().splitlines()[2]
    assert "17->per image" in capsys.readouterr().out
    # A fixed schedule of the same method keeps its exact count.
    assert hf_eval(hf_vit_dir, tiny_image_folder, out, "--methods", "atc", "--r", "6", "--no-timing") == 0
    row = json.loads((out / "results.json").read_text())["rows"][1]
    assert (row["tokens_in"], row["tokens_out"]) == (17, 17 - 2 * 6)


def test_configurations_whose_labels_coincide_keep_their_own_timing(hf_vit_dir, tiny_image_folder, tmp_path,
                                                                     capsys, monkeypatch):
    """Two DTEM runs each write dtem_modules.safetensors: their rows are timed separately and
    labelled with the folder that tells them apart."""
    from tokenmerge.backends.adapter import adapter_for
    from tokenmerge.methods.dtem import save_merge_modules
    from tokenmerge.models import load_model

    configs = []
    for run in ("run_a", "run_b"):
        trained = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), method="dtem", r=2)
        with torch.no_grad():
            for parameter in adapter_for(trained).reducer.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        (tmp_path / run).mkdir()
        modules = save_merge_modules(trained, tmp_path / run / "dtem_modules.safetensors")
        configs += ["--config", str(tmp_path / f"{run}.json")]
        Path(configs[-1]).write_text(json.dumps({"method": "dtem", "r": 2, "options": {"modules": str(modules)}}))
    timed = []

    def fake_throughput(models, **kwargs):  # a distinct figure per model it is given
        timed.append(list(models.values()))
        return {key: {"images_per_s": 100.0 + i, "ms_per_batch": 1.0} for i, key in enumerate(models)}

    monkeypatch.setattr(sweep, "measure_throughput", fake_throughput)
    out = tmp_path / "out"
    assert hf_eval(hf_vit_dir, tiny_image_folder, out, "--methods", "tome", "--r", "2", *configs) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(timed) == 1 and len(timed[0]) == 4 and len({id(model) for model in timed[0]}) == 4
    assert [row["images_per_s"] for row in rows] == [100.0, 101.0, 102.0, 103.0]
    assert [row["label"] for row in rows[2:]] == ["dtem r=2 modules=run_a/dtem_modules.safetensors",
                                                  "dtem r=2 modules=run_b/dtem_modules.safetensors"]
    text = capsys.readouterr().out
    assert "modules=run_a/dtem_modules.safetensors" in text and "modules=run_b/dtem_modules.safetensors" in text


def test_distinct_file_names_add_parent_folders_only_where_names_collide():
    names = sweep.distinct_file_names(["/x/a/m.safetensors", "/x/b/m.safetensors", "/x/c/other.safetensors",
                                       "/p/run/k.st", "/q/run/k.st"])
    assert names == {"/x/a/m.safetensors": "a/m.safetensors", "/x/b/m.safetensors": "b/m.safetensors",
                     "/x/c/other.safetensors": "other.safetensors", "/p/run/k.st": "p/run/k.st",
                     "/q/run/k.st": "q/run/k.st"}
    variant = sweep.Variant.create("dtem", "8", {"modules": "/x/a/m.safetensors"})
    assert variant.label == "dtem r=8 modules=m.safetensors"
    assert variant.describe(names) == "dtem r=8 modules=a/m.safetensors"


def saved_results(path: Path) -> Path:
    """A small results.json as tokenmerge eval writes it."""
    rows = [{"method": "none", "schedule": "-", "options": {}, "accuracy": 85.0, "gflops": 2.5},
            {"method": "tome", "schedule": "8", "options": {}, "accuracy": 84.0, "gflops": 1.8}]
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"meta": {"model": "m", "data": "d", "num_images": 2},
                                                   "rows": rows}))
    return path / "results.json"


def test_from_results_plots_into_out_when_given(tmp_path, capsys):
    results = saved_results(tmp_path / "saved")
    out = tmp_path / "report"
    assert main(["eval", "--from-results", str(results), "--out", str(out), "--plot"]) == 0
    assert (out / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not (results.parent / "pareto.png").exists()
    assert f"wrote the Pareto plot to {out / 'pareto.png'}" in capsys.readouterr().out
    # Without --out: beside the results file, as before.
    assert main(["eval", "--from-results", str(results), "--plot"]) == 0
    assert (results.parent / "pareto.png").is_file()


def test_from_results_refuses_what_only_an_evaluation_reads(tmp_path, capsys):
    results = saved_results(tmp_path / "saved")
    code, err = run_cli(["eval", "--from-results", str(results), "--limit", "3", "--methods", "atc"], capsys)
    assert code == 2 and "--limit, --methods would be ignored" in err and "drop them" in err
    code, err = run_cli(["eval", "vit_small_patch16_224", "--from-results", str(results)], capsys)
    assert code == 2 and "MODEL would be ignored" in err
    assert not (tmp_path / "saved" / "pareto.png").exists()


def test_budget_metric_without_a_budget_is_refused(tmp_path, capsys):
    # (the small-run flags keep a regression, which would evaluate, quick to fail)
    code, err = run_cli(["eval", "--budget-metric", "throughput", "--limit", "2", "--r", "8", "--no-timing",
                         "--threads", "1", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--budget-metric throughput" in err
    assert "--target-speedup" in err and "--target-gflops" in err and "drop --budget-metric" in err


def test_a_long_title_stays_inside_a_one_panel_plot():
    """Without throughput there is one panel, narrower than a model name and data path: the
    title is wrapped instead of running off both edges."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [{"method": "none", "schedule": "-", "accuracy": 85.0, "gflops": 2.5},
            {"method": "tome", "schedule": "8", "accuracy": 84.0, "gflops": 1.8}]
    title = "vit_tiny_patch16_224 (checkpoint vit_tiny_d6_patch16_224.imagenette.safetensors) on val (3925 images)"
    figure = pareto_figure(rows, title=title)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    (drawn,) = figure.texts  # the suptitle
    box = drawn.get_window_extent(renderer)
    assert len(figure.axes) == 1 and drawn.get_text() == title
    assert box.x0 >= 0 and box.x1 <= figure.bbox.x1


def test_per_image_rows_are_timed_on_the_evaluated_images(monkeypatch):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    base = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()
    images, labels = torch.randn(10, 3, 32, 32), torch.randint(0, 3, (10,))
    example = torch.randn(4, 3, 32, 32)
    given = []

    def fake_throughput(models, inputs=None, **kwargs):
        given.append(inputs)
        return {key: {"images_per_s": 100.0, "ms_per_batch": 1.0} for key in models}

    monkeypatch.setattr(sweep, "measure_throughput", fake_throughput)
    fixed = [sweep.Variant.create("tome", "2")]
    per_image = fixed + [sweep.Variant.create("atc", "4", {"threshold": [0.9, 0.9]})]
    for variants in (fixed, per_image):
        sweep.run_sweep(base, variants, images, labels, 3, timing_batch_size=4, progress=False,
                        log=lambda *_: None, example=example)
    assert given[0] is example  # fixed schedules cost the same on any input: random ones
    assert torch.equal(given[1], images[[0, 3, 6, 9]])  # spread over the evaluated images
