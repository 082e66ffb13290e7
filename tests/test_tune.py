"""tokenmerge.tune and `tokenmerge tune`: budgets counted exactly, output that patch accepts."""

import json
import re
import warnings

import pytest
import timm
import torch

import tokenmerge
from tokenmerge.cli import main
from tokenmerge.core.schedule import ScheduleClampedWarning
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.tune import (Candidate, TuneResult, _fill_budget, option_grid, read_config,
                                        resolve_budget, tune)


def small_vit(**kwargs):
    torch.manual_seed(0)
    kwargs = {"img_size": 32, **kwargs}
    model = timm.create_model("vit_tiny_patch16_224", patch_size=4, depth=4, embed_dim=48,
                              num_heads=3, num_classes=5, **kwargs)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return small_vit()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 5, (12,), generator=g)


@pytest.fixture(scope="module")
def result(model, images):
    return tune(model, images, gflops_fraction=0.55, methods=["tome", "mctf", ("tome", {"mlp_share": 1.0})],
                rounds=2, batch_size=5, progress=False)


def test_budget_is_met_by_counted_gflops(model, images, result):
    target = 0.55 * count_gflops(model, images=images[0][:1])
    assert result.target_gflops == pytest.approx(target)
    for candidate in result.candidates:
        patched = tokenmerge.patch(small_vit(), **candidate.config())
        assert count_gflops(patched, images=images[0][:1]) == pytest.approx(candidate.gflops, rel=1e-9)
        assert candidate.gflops <= target
    # The constant-r start is the smallest constant that fits: one less does not.
    tome = next(c for c in result.candidates if c.method == "tome" and c.stage == "constant")
    with warnings.catch_warnings():
        # The smaller constant may still be more than the last block can remove: clamped there.
        warnings.simplefilter("ignore", ScheduleClampedWarning)
        looser = tokenmerge.patch(small_vit(), r=max(tome.r) - 1)
    assert count_gflops(looser, images=images[0][:1]) > target


class _TokenCost:
    """A stand-in scorer: cost = tokens carried through the blocks after each reduction."""

    num_blocks, num_tokens = 4, 20

    def effective(self, schedule):
        return tuple(schedule)

    def gflops(self, schedule):
        n, total = self.num_tokens, 0
        for r in schedule:
            n -= r
            total += n
        return total


def test_budget_fill_keeps_tokens_in_the_last_blocks_first():
    scorer = _TokenCost()
    # Constant 3 costs 17+14+11+8 = 50; a budget of 53 pays for three more kept tokens:
    # one in the last block (+1), then one in the third (+2), and nothing earlier fits.
    assert _fill_budget(scorer, (3, 3, 3, 3), 53) == (3, 3, 2, 2)
    assert _fill_budget(scorer, (3, 3, 3, 3), 50) == (3, 3, 3, 3)
    assert _fill_budget(scorer, (0, 0, 1, 1), 80) == (0, 0, 0, 0)


def test_filled_starts_spend_the_slack_and_stay_within_budget(result):
    filled_starts = [c for c in result.candidates if c.stage == "constant, budget filled"]
    assert filled_starts  # this budget leaves slack under every constant r
    for filled in filled_starts:
        constant = next(c for c in result.candidates
                        if (c.method, c.options) == (filled.method, filled.options) and c.stage == "constant")
        assert constant.gflops < filled.gflops <= result.target_gflops
        assert all(f <= c for f, c in zip(filled.r, constant.r))


def test_best_round_trips_through_patch_and_json(model, images, result, tmp_path):
    out = result.save(tmp_path)
    config = json.loads((out / "best.json").read_text())
    assert set(config) == {"method", "r", "options"}
    patched = tokenmerge.patch(small_vit(), **config)
    assert tuple(patched.tokens_per_block()[i] - patched.tokens_per_block()[i + 1]
                 for i in range(len(patched.blocks))) == result.best.r
    with torch.inference_mode():
        logits = patched(images[0])
        reference = model(images[0])
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                    reduction="batchmean").item()
    assert kl == pytest.approx(result.best.kl, rel=1e-4, abs=1e-7)
    assert result.best.loss == min(c.loss for c in result.candidates)
    rows = json.loads((out / "candidates.json").read_text())["candidates"]
    assert len(rows) == len(result.candidates) and sum(row["best"] for row in rows) == 1


def test_trained_dtem_modules_are_a_candidate_and_round_trip(model, images, tmp_path):
    trained = tokenmerge.patch(small_vit(), method="dtem", r=4, embed_dim=8, init="random")
    modules = tokenmerge.save_merge_modules(trained, tmp_path / "modules.safetensors")
    result = tune(model, images, gflops_fraction=0.6, methods=[("dtem", {"modules": str(modules)})], rounds=1,
                  progress=False, measure_speed=False)
    config = read_config(result.save(tmp_path / "out") / "best.json")
    assert config["method"] == "dtem" and config["options"] == {"modules": str(modules)}
    patched = tokenmerge.patch(small_vit(), **config)
    assert torch.equal(patched.token_reducer.embeds[0].proj.weight, trained.token_reducer.embeds[0].proj.weight)
    with torch.inference_mode():
        kl = torch.nn.functional.kl_div(patched(images[0]).log_softmax(-1), model(images[0]).log_softmax(-1),
                                        log_target=True, reduction="batchmean").item()
    assert kl == pytest.approx(result.best.kl, rel=1e-4, abs=1e-7)


def test_read_config_returns_what_tune_saved(result, tmp_path):
    out = result.save(tmp_path)
    assert read_config(out / "best.json") == result.config()
    patched = tokenmerge.patch(small_vit(), **read_config(out / "best.json"))
    assert patched.tokenmerge_schedule() == result.best.r


@pytest.mark.parametrize("text,message", [
    (None, "does not exist"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"method": "tome"}', "missing ['r']"),
    ('{"method": "tome", "r": 4, "schedule": 4}', "unknown ['schedule']"),
    ('{"method": "tomee", "r": 4}', "unknown method 'tomee'"),
    ('{"method": "tome", "r": [4, -1]}', "bad 'r'"),
    ('{"method": "tome", "r": "4"}', "bad 'r'"),
    ('{"method": "tome", "r": 4, "options": [1]}', "'options' must be a JSON object"),
])
def test_read_config_names_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "best.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape(message)) as err:
        read_config(path)
    assert str(path) in str(err.value)


def test_search_never_returns_worse_than_its_constant_start(result):
    for method in {c.method for c in result.candidates}:
        constant = next(c for c in result.candidates if c.method == method and c.stage == "constant")
        assert result.best.loss <= constant.loss


def test_option_search_keeps_the_best_value_of_each_option(model, images):
    from tokenmerge.methods import create_reducer
    from tokenmerge.methods.mctf import MCTF

    result = tune(model, images, gflops_fraction=0.55, methods=[("mctf", {"tau_size": 40.0})], rounds=0,
                  progress=False, measure_speed=False)
    tried = [c for c in result.candidates if c.stage.startswith("options:")]
    moved = {c.stage.split(": ")[1].split("=")[0] for c in tried}
    assert moved == set(option_grid(MCTF())) - {"tau_size"}  # the caller's option stays as given
    assert set(option_grid(MCTF())) == {"keep_norm", *MCTF.option_grid}
    for method in ("prune", "drop"):  # nothing fused, no norm to keep
        assert option_grid(create_reducer(method)) == {}
    assert all(c.options["tau_size"] == 40.0 for c in result.candidates)
    start = [c for c in result.candidates if c.stage.startswith("constant")]
    assert all(c.r == min(start, key=lambda c: c.loss).r for c in tried)  # scored at the method's start
    best_before_search = min(start + tried, key=lambda c: c.loss)
    assert result.best.options == best_before_search.options  # rounds=0: the options stage decides
    assert result.best.loss == best_before_search.loss
    # the chosen options round-trip through patch and give the scored logits' KL
    patched = tokenmerge.patch(small_vit(), **result.config())
    assert patched.token_reducer.tau_sim == result.best.options.get("tau_sim", 1.0)
    assert patched.token_reducer.keep_norm is result.best.options.get("keep_norm", False)


def test_option_search_comes_after_the_schedule_search_and_never_loses(model, images):
    settings = dict(gflops_fraction=0.55, methods=["mctf"], rounds=2, progress=False, measure_speed=False)
    off = tune(model, images, search_options=False, **settings)
    assert not any(c.stage.startswith("options:") for c in off.candidates) and off.best.options == {}
    on = tune(model, images, **settings)
    searched = [c for c in on.candidates if c.stage.startswith("search")]
    tried = [c for c in on.candidates if c.stage.startswith("options:")]
    assert tried and on.candidates.index(tried[0]) > on.candidates.index(searched[-1])
    # options are scored at the schedule search's result (the best of the default options' candidates)
    (schedule,) = {c.r for c in tried}
    assert min(c.loss for c in on.candidates if c.r == schedule and not c.options) == off.best.loss
    assert on.best.loss <= off.best.loss


def test_model_is_left_unmodified(model, images, result):
    assert not tokenmerge.is_patched(model)


@pytest.mark.parametrize("budget,message", [
    (dict(target_gflops=0), "target_gflops must be positive"),
    (dict(target_gflops=-1.0), "target_gflops must be positive"),
    (dict(target_speedup=1.0), "target_speedup must be > 1"),
    (dict(target_speedup=float("nan")), "finite"),
    (dict(gflops_fraction=1.5), "gflops_fraction must lie in"),
    (dict(), "give exactly one budget"),
    (dict(target_gflops=1.0, gflops_fraction=0.5), "give exactly one budget"),
])
def test_malformed_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        resolve_budget(2.0, **budget)


def test_unreachable_budget_names_the_best_reachable(model, images):
    with pytest.raises(ValueError, match="cannot be met"):
        tune(model, images, gflops_fraction=0.01, methods=["tome"], progress=False, measure_speed=False)


def test_bad_arguments(model, images):
    with pytest.raises(ValueError, match="needs labels"):
        tune(model, images[0], gflops_fraction=0.5, objective="accuracy", progress=False)
    with pytest.raises(ValueError, match="needs labels"):  # an (images, None) pair is unlabelled data
        tune(model, (images[0], None), gflops_fraction=0.5, objective="accuracy", progress=False)
    with pytest.raises(ValueError, match="objective must be one of"):
        tune(model, images, gflops_fraction=0.5, objective="top5", progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        tune(model, images, gflops_fraction=0.5, methods=["nope"], progress=False)
    patched = tokenmerge.patch(small_vit(), r=1)
    with pytest.raises(ValueError, match="unpatch"):
        tune(patched, images, gflops_fraction=0.5, progress=False)


def test_candidates_are_checked_before_any_work(model, images):
    quick = dict(gflops_fraction=0.6, rounds=0, progress=False, measure_speed=False)
    with pytest.raises(ValueError, match="calibrates per-image thresholds itself"):
        tune(model, images, methods=[("atc", {"threshold": 0.9})], **quick)
    with pytest.raises(TypeError, match="linkge"):
        tune(model, images, methods=["tome", ("atc", {"linkge": "average"})], **quick)
    with pytest.raises(ValueError, match="include 'atc'"):
        tune(model, images, methods=["tome"], per_image=True, **quick)
    with pytest.raises(ValueError, match="include 'atc'"):
        tune(model, images, methods=[("atc", {"prop_attn": False})], per_image=True, **quick)
    for entry in [("tome",), ["tome", None], 3]:
        with pytest.raises(ValueError, match="a name or a \\(name, options dict\\) pair"):
            tune(model, images, methods=[entry], **quick)
    with pytest.raises(ValueError, match="speed_batch_size must be an int >= 1"):
        tune(model, images, methods=["tome"], speed_batch_size=0, **quick)
    # One name alone is one candidate, not one per letter.
    assert {c.method for c in tune(model, images, methods="tome", **quick).candidates} == {"tome"}


@pytest.mark.parametrize("data", [
    "two image batches", "images and a list of labels", "a dataset of single items", "numpy budget"])
def test_calibration_data_in_the_forms_users_pass(model, images, data):
    x, y = images
    quick = dict(methods=["tome"], rounds=0, progress=False, measure_speed=False)
    reference = tune(model, (x, y), gflops_fraction=0.6, **quick)
    if data == "two image batches":  # a list of two batches is not an (images, labels) pair
        result = tune(model, [x[:6], x[6:]], gflops_fraction=0.6, **quick)
        assert result.num_images == 12 and result.best.accuracy is None
    elif data == "images and a list of labels":
        result = tune(model, (x, y.tolist()), gflops_fraction=0.6, **quick)
        assert result.best.accuracy == reference.best.accuracy
    elif data == "a dataset of single items":
        result = tune(model, torch.utils.data.TensorDataset(x, y), gflops_fraction=0.6, **quick)
        assert result.num_images == 12 and result.best.accuracy == reference.best.accuracy
    else:
        import numpy as np

        result = tune(model, (x, y), gflops_fraction=np.float32(0.6), **quick)
    assert result.best.kl == pytest.approx(reference.best.kl)


def test_labels_must_be_one_class_index_per_image_of_the_head(model, images):
    x, y = images
    quick = dict(gflops_fraction=0.6, methods=["tome"], rounds=0, progress=False, measure_speed=False)
    for labels in (y[:, None], y[:1], y.float()):
        with pytest.raises(ValueError, match="labels must be 12 integer class indices"):
            tune(model, (x, labels), **quick)
    with pytest.raises(ValueError, match="the model predicts 5 classes"):
        tune(model, (x, y + 5), **quick)


def test_tune_leaves_each_module_in_its_own_mode_and_times_non_square_images(images):
    model = small_vit(img_size=(32, 48))
    model.train()
    model.blocks[0].eval()
    x = torch.randn(6, 3, 32, 48)
    result = tune(model, x, gflops_fraction=0.6, methods=["tome"], rounds=0, speed_batch_size=2, progress=False)
    assert result.best.speedup is not None
    assert model.training and not model.blocks[0].training and model.blocks[1].training


def test_tune_scores_in_the_dtype_asked_for(model, images):
    quick = dict(gflops_fraction=0.6, methods=["tome"], rounds=0, progress=False, measure_speed=False)
    full = tune(model, images, **quick)
    half = tune(model, images, dtype=torch.bfloat16, **quick)
    assert half.best.r == full.best.r and half.best.kl != full.best.kl


def test_tune_command_refuses_unknown_methods_and_bad_options_while_parsing(capsys):
    for candidate, message in (("nope", "unknown method"), ("tome:prop_attn", "KEY=VALUE")):
        with pytest.raises(SystemExit):
            main(["tune", "--data", "x", "--gflops-fraction", "0.5", "--methods", candidate])
        assert message in capsys.readouterr().err


def test_label_free_objective_from_a_loader(model, images):
    loader = torch.utils.data.DataLoader(images[0], batch_size=4)
    result = tune(model, loader, gflops_fraction=0.6, methods=["tome"], rounds=1, objective="agreement",
                  progress=False, measure_speed=False)
    assert result.best.accuracy is None and result.num_images == 12
    unlabelled = tune(model, (images[0], None), gflops_fraction=0.6, methods=["tome"], rounds=1,
                      objective="agreement", progress=False, measure_speed=False)
    assert unlabelled.best.config() == result.best.config() and unlabelled.best.accuracy is None
    assert result.best.loss == pytest.approx(1 - result.best.agreement / 100)


def test_tune_command_on_the_embedded_model(tmp_path, capsys):
    from tokenmerge.commands.eval import DEFAULT_DATA

    out = tmp_path / "tune"
    code = main(["tune", "--data", str(DEFAULT_DATA), "--limit", "10", "--gflops-fraction", "0.6",
                 "--methods", "tome", "tome:prop_attn=false", "--rounds", "0", "--no-timing",
                 "--threads", "2", "--out", str(out)])
    assert code == 0
    config = json.loads((out / "best.json").read_text())
    text = capsys.readouterr().out
    assert "best:" in text and "prop_attn" in text
    assert (out / "pareto.png").stat().st_size > 0
    from tokenmerge.models import load_model

    base_gflops = count_gflops(load_model())
    assert count_gflops(tokenmerge.patch(load_model(), **config)) <= 0.6 * base_gflops


def test_tune_command_rejects_bad_budgets(capsys):
    for argv in (["--gflops-fraction", "0"], ["--target-speedup", "inf"], ["--target-gflops", "-2"]):
        with pytest.raises(SystemExit):
            main(["tune", "--data", "x", *argv])
        assert "must be a finite number" in capsys.readouterr().err


def test_model_kwargs_load_a_checkpoint_of_another_depth():
    from pathlib import Path

    from tokenmerge.cli import build_parser
    from tokenmerge.commands.common import model_from_args

    checkpoint = Path(__file__).resolve().parents[1] / "benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors"
    args = build_parser().parse_args(["tune", "--data", "x", "--gflops-fraction", "0.5", "--checkpoint",
                                      str(checkpoint), "--model-kwargs", '{"depth": 6}'])
    assert len(model_from_args(args).blocks) == 6
    args = build_parser().parse_args(["eval", "--checkpoint", str(checkpoint)])
    with pytest.raises(ValueError, match=r"has 6 blocks but vit_tiny_patch16_224 builds 12: pass depth=6"):
        model_from_args(args)


def test_tune_on_a_hugging_face_model_caches_block_inputs(hf_vit_dir):
    from tokenmerge.evaluation.tune import _Scorer
    from tokenmerge.models import load_model

    model = load_model(f"hf:{hf_vit_dir}")
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    scorer = _Scorer(model, "tome", {}, images, batch_size=4, probe_every=2,
                     base_gflops=count_gflops(model, images=images[:1]))
    assert scorer.num_blocks == 2 and scorer.num_tokens == 17
    with torch.inference_mode():
        full = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), r=[3, 2])(images).logits
        reference = model(images).logits
    torch.testing.assert_close(scorer.logits((3, 2)), full, rtol=1e-5, atol=1e-6)
    assert torch.equal(scorer.logits((0, 0)), reference)  # r=0: the unmodified model, bit for bit
    # A probe starts from the incumbent's cached block inputs and gives the full forward's logits.
    scorer.set_incumbent((3, 0))
    torch.testing.assert_close(scorer.probe_logits((3, 2)), full[::2], rtol=1e-5, atol=1e-6)
    assert scorer.gflops((3, 2)) == pytest.approx(count_gflops(tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"),
                                                                                  r=[3, 2]), images=images[:1]))


def test_tune_command_on_a_hugging_face_folder(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    from tokenmerge.models import load_model

    out = tmp_path / "tune"
    code = main(["tune", f"hf:{hf_vit_dir}", "--data", str(tiny_image_folder), "--gflops-fraction", "0.8",
                 "--methods", "tome", "--rounds", "1", "--batch-size", "4", "--probe-images", "6",
                 "--no-timing", "--threads", "1", "--out", str(out)])
    assert code == 0
    config = json.loads((out / "best.json").read_text())
    assert "best:" in capsys.readouterr().out
    images = torch.zeros(1, 3, 32, 32)
    base_gflops = count_gflops(load_model(f"hf:{hf_vit_dir}"), images=images)
    merged = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), **config)
    assert count_gflops(merged, images=images) <= 0.8 * base_gflops
    assert len(config["r"]) == 2 and sum(config["r"]) > 0


def test_dtem_matchings_as_candidates_meet_the_budget_and_round_trip(model, images, tmp_path):
    from tokenmerge.methods.dtem import save_merge_modules

    modules = str(save_merge_modules(tokenmerge.patch(small_vit(), method="dtem", r=4, embed_dim=16, init="random"),
                                     tmp_path / "modules.safetensors"))
    methods = [("dtem", {"modules": modules}), ("dtem", {"modules": modules, "matching": "agglomerative"})]
    result = tune(model, images, gflops_fraction=0.6, methods=methods, rounds=1, search_methods=2,
                  batch_size=6, progress=False, measure_speed=False)
    for matching in ("bipartite", "agglomerative"):
        found = [c for c in result.candidates if c.options.get("matching", "bipartite") == matching]
        assert {"constant", "search round 1"} <= {c.stage for c in found}
        for candidate in found:
            patched = tokenmerge.patch(small_vit(), **json.loads(json.dumps(candidate.config())))
            assert patched.token_reducer.matching == matching
            # Clustering compares every pair (M x M), bipartite matching A x B: both counted.
            assert count_gflops(patched, images=images[0][:1]) == pytest.approx(candidate.gflops, rel=1e-9)
            assert candidate.gflops <= result.target_gflops


def test_a_per_image_best_is_saved_with_the_best_fixed_schedule(tmp_path):
    def candidate(loss, **options):
        return Candidate("atc", options, (2, 2), 1.0, loss, loss, 99.0, None, "constant")

    worse, fixed, per_image = candidate(0.03), candidate(0.02, keep_norm=True), candidate(0.01, threshold=[0.9, 0.8])
    result = TuneResult(per_image, [worse, fixed, per_image], 2.0, 1.0, "kl", 8, 1.0)
    assert result.best_fixed is fixed
    out = result.save(tmp_path)
    assert read_config(out / "best.json")["options"]["threshold"] == [0.9, 0.8]
    assert read_config(out / "best_fixed.json") == {"method": "atc", "r": [2, 2], "options": {"keep_norm": True}}
    # a later run into the same folder whose best is fixed leaves no stale best_fixed.json
    assert TuneResult(fixed, [worse, fixed], 2.0, 1.0, "kl", 8, 1.0).save(tmp_path) == out
    assert not (out / "best_fixed.json").exists() and read_config(out / "best.json") == fixed.config()
    assert TuneResult(per_image, [per_image], 2.0, 1.0, "kl", 8, 1.0).best_fixed is None


def test_per_image_thresholds_join_tune_within_the_budget_per_image(model, images):
    result = tune(model, images, gflops_fraction=0.6, methods=["atc"], rounds=0, search_options=False,
                  batch_size=6, progress=False, measure_speed=False, per_image=True)
    per_image = result.candidates[-1]
    assert per_image.stage == "per-image thresholds" and per_image.method == "atc"
    assert len(per_image.options["threshold"]) == 4 and per_image.gflops <= result.target_gflops
    patched = tokenmerge.patch(small_vit(), **json.loads(json.dumps(per_image.config())))
    patched.load_state_dict(model.state_dict())
    alone = [count_gflops(patched, images=images[0][i:i + 1]) for i in range(len(images[0]))]
    assert per_image.gflops == pytest.approx(sum(alone) / len(alone), rel=1e-9)
    with pytest.raises(ValueError, match="include 'atc'"):
        tune(model, images, gflops_fraction=0.6, methods=["tome"], rounds=0, search_options=False,
             batch_size=6, progress=False, measure_speed=False, per_image=True)
