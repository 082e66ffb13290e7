"""``tokenmerge train``: DTEM merge embeddings (modular / end2end), or fine-tuning with ToMe,
MCTF, PiToMe, TC-ViT, EViT-style or pruning reduction (or the configuration ``tokenmerge tune``
chose, ``--config best.json``); optional distillation from a frozen teacher.

Also runnable as ``python -m tokenmerge.commands.train ...`` (e.g. under ``torchrun``).
"""

from __future__ import annotations

import argparse
import json

from . import arguments
from .arguments import positive_int as _positive_int

__all__ = ["add_parser", "run", "config_from_args", "main"]


def _tau(text: str) -> float:
    try:
        return arguments.finite_positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"tau must be a finite number > 0 (0.1-0.3 work well), got {text}") from None


def _distill_weight(text: str) -> float:
    value = arguments.finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"must lie in (0, 1] (the distillation share of the loss; 1.0 uses no labels), got {text}")
    return value


def _temperature(text: str) -> float:
    try:
        return arguments.finite_positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (1-4 is usual), got {text}") from None


# An int r, or any schedule form accepted by --r elsewhere (13:-1, 16,16,8).
_eval_r = arguments.schedule


def _configure(parser: argparse.ArgumentParser) -> None:
    from ..training import METHODS, MODES, default_train_root

    parser.add_argument("--method", choices=METHODS, default=None,
                        help="dtem (default): learned merge embeddings; tome, mctf, pitome, tcvit, evit, prune: "
                             "fine-tune the ViT with that reduction in its forward (hard plan, no gradient "
                             "through the selection)")
    parser.add_argument("--config", type=arguments.patch_config, default=None, metavar="JSON",
                        help="train the configuration tokenmerge tune wrote (OUT/best.json: method, per-block "
                             "r, options) instead of --method/--r/--method-option")
    parser.add_argument("--mode", choices=MODES, default="modular",
                        help="dtem: modular: frozen ViT, only the merge embeddings learn; end2end: the ViT too; "
                             "backbone: only the ViT, around fixed trained modules (--init-modules) merging as "
                             "at inference (tome/mctf/pitome/atc/tcvit/evit/prune have no parameters of their "
                             "own: always end2end)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the method, e.g. order=2 or dominance_weight=1.0 for tcvit; repeatable")
    parser.add_argument("--data", default=None,
                        help="training data: one sub-folder per class of what the model takes (images; WAV/FLAC "
                             f"for an AST, videos for a VideoMAE/ViViT) (default: {default_train_root()})")
    parser.add_argument("model", nargs="?", default=None,
                        help="timm architecture name, or hf:DIR for a Hugging Face image, AST audio or VideoMAE/ViViT "
                             "video classifier saved "
                             "with save_pretrained (end2end writes OUT/model/, loadable as hf:OUT/model) "
                             "(default: the embedded ViT-Tiny Imagenette model)")
    parser.add_argument("--checkpoint", help="local .safetensors or .pth state_dict with timm key names")
    parser.add_argument("--num-classes", type=_positive_int)
    parser.add_argument("--model-kwargs", type=arguments.json_object, default={},
                        help='extra timm.create_model arguments as JSON, e.g. \'{"img_size": 32}\'')
    parser.add_argument("--r", "--merge-r", dest="r", type=arguments.schedule, default=None,
                        help="tokens merged per block in training (default 16), or one value per block "
                             "(16,16,14,...): use the largest r you will evaluate (--merge-r: the same, for "
                             "torchrun, whose own options swallow --r)")
    parser.add_argument("--tau", type=_tau, default=None,
                        help="dtem modular/end2end: the soft merge's temperature (default 0.1)")
    parser.add_argument("--init-modules", default=None, metavar="FILE",
                        help="dtem: start from these trained merge modules (.safetensors written by a "
                             "modular run or tokenmerge.save_merge_modules), e.g. to fine-tune end2end")
    parser.add_argument("--embed-dim", type=_positive_int, default=None,
                        help="dtem: the merge embedding's width (default 64)")
    parser.add_argument("--hidden-dim", type=_positive_int, default=None,
                        help="dtem: an MLP merge embedding with this hidden width (default: affine)")
    parser.add_argument("--epochs", type=arguments.finite_positive_float, default=1.0)
    parser.add_argument("--max-steps", type=_positive_int, default=None, help="overrides --epochs")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="per process")
    parser.add_argument("--lr", type=arguments.finite_positive_float, default=None,
                        help="learning rate of what the method trains: dtem's merge embeddings (default 1e-3), "
                             "the ViT for tome and the other methods (default 1e-5)")
    parser.add_argument("--backbone-lr", type=arguments.finite_positive_float, default=None,
                        help="dtem end2end and backbone: the ViT's learning rate (default 1e-5)")
    parser.add_argument("--weight-decay", type=arguments.finite_non_negative_float, default=0.05)
    parser.add_argument("--warmup-steps", type=arguments.non_negative_int, default=20)
    parser.add_argument("--mixup", type=arguments.finite_non_negative_float, default=0.0, metavar="ALPHA",
                        help="Mixup's Beta parameter (default 0: off; timm's ViT recipe: 0.8)")
    parser.add_argument("--cutmix", type=arguments.finite_non_negative_float, default=0.0, metavar="ALPHA",
                        help="CutMix's Beta parameter (default 0: off; timm's ViT recipe: 1.0); with --mixup "
                             "too, each batch uses one of them at even odds")
    parser.add_argument("--limit", type=_positive_int, default=None, help="use N training files, evenly spaced over the (class-sorted) folder")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0)
    parser.add_argument("--out", type=arguments.output_folder, default="runs/train",
                        help="output folder (checkpoints, modules, results)")
    parser.add_argument("--checkpoint-every", type=_positive_int, default=50, help="steps")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the run already in OUT (without --resume or --overwrite it is refused)")
    parser.add_argument("--num-workers", type=arguments.non_negative_int, default=0)
    parser.add_argument("--device", type=arguments.device, default=None,
                        help="cpu, cuda, cuda:N or mps (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--threads", type=arguments.threads, default=None, help="torch CPU threads")
    parser.add_argument("--eval-data", default=None, help="default: the 'val' folder beside --data")
    parser.add_argument("--eval-r", nargs="*", type=_eval_r, default=None,
                        help="evaluate at these r after training (default: the training r)")
    parser.add_argument("--eval-limit", type=_positive_int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    distill = parser.add_argument_group("distillation")
    distill.add_argument("--distill", action="store_true",
                         help="distil from a frozen teacher: the unmodified model (default) or --teacher")
    distill.add_argument("--distill-weight", type=_distill_weight, default=None,
                         help="share of the distillation term in the loss (default 0.5); 1.0 uses no labels, "
                              "so --data may then be a flat folder of images")
    distill.add_argument("--distill-temperature", type=_temperature, default=None,
                         help="softmax temperature T of the distillation term (default 1.0)")
    distill.add_argument("--teacher", default=None, metavar="CHECKPOINT",
                         help="teacher weights (.safetensors/.pth, timm key names) or hf:DIR (a Hugging Face "
                              "classifier folder); default: a frozen copy of the model before token reduction")
    distill.add_argument("--teacher-model", default=None, metavar="NAME",
                         help="the teacher checkpoint's timm architecture (default: the student's)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train DTEM merge embeddings or fine-tune with ToMe/MCTF/TC-ViT/EViT/pruning",
        description=(
            "Train DTEM's merge embeddings (modular: frozen ViT; end2end: the ViT too) or "
            "fine-tune a ViT with ToMe, MCTF, PiToMe, TC-ViT, EViT-style or pruning reduction "
            "(or the configuration tokenmerge tune chose: --config best.json), on a "
            "folder of images, audio clips or videos (one sub-folder per class), optionally distilling from the unmodified model (--distill); "
            "checkpoints every --checkpoint-every steps, --resume continues a killed run, "
            "torchrun for DDP."
        ),
    )
    _configure(parser)
    parser.set_defaults(func=run)


def config_from_args(args):
    from ..training import TrainConfig

    from ..evaluation.sweep import parse_option
    from ..training import PARAMETER_FREE_METHODS

    if args.config is not None:
        given = [flag for flag, value in (("--method", args.method), ("--r", args.r),
                                          ("--method-option", args.method_option)) if value]
        if given:
            raise ValueError(f"--config sets the method, r and options: drop {', '.join(given)}")
        method, r, options = args.config["method"], args.config["r"], dict(args.config["options"])
    else:
        method = args.method or "dtem"
        r = 16 if args.r is None else args.r
        options = {}
        for text in args.method_option:
            named, key, value = parse_option(text)
            if named not in (None, method):
                raise ValueError(f"--method-option {text!r} names method {named!r}, but --method is {method}")
            options[key] = value
    if args.mode == "backbone" and method in PARAMETER_FREE_METHODS:
        raise ValueError(f"--mode backbone trains the ViT around fixed DTEM merge modules; {method} has none: "
                         "drop --mode (it fine-tunes the ViT end to end)")
    if args.mode == "backbone" and args.lr is not None:
        raise ValueError("--mode backbone trains only the ViT, at --backbone-lr (the merge modules stay fixed): "
                         "drop --lr")
    mode = "end2end" if method in PARAMETER_FREE_METHODS else args.mode
    _refuse_unused(args, method, mode)
    eval_r = args.eval_r if args.eval_r is not None else [r]
    for flag, value in (("--distill-weight", args.distill_weight), ("--distill-temperature", args.distill_temperature)):
        if value is not None and not args.distill:
            raise ValueError(f"{flag} sets up distillation: add --distill")
    return TrainConfig(
        method=method, mode=mode,
        data=args.data, model=args.model, checkpoint=args.checkpoint,
        model_kwargs=args.model_kwargs, num_classes=args.num_classes, r=r, tau=args.tau,
        init_modules=args.init_modules,
        embed_dim=args.embed_dim, hidden_dim=args.hidden_dim, epochs=args.epochs,
        max_steps=args.max_steps, batch_size=args.batch_size,
        # None: the run's defaults (tokenmerge.training.learning_rates), the API's too.
        lr=args.lr, backbone_lr=args.backbone_lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, limit=args.limit,
        seed=args.seed, out=str(args.out), checkpoint_every=args.checkpoint_every,
        num_workers=args.num_workers, device=args.device, eval_data=args.eval_data,
        eval_r=eval_r, eval_limit=args.eval_limit, progress=not args.no_progress,
        method_options=options, mixup=args.mixup, cutmix=args.cutmix, distill=args.distill,
        distill_weight=0.5 if args.distill_weight is None else args.distill_weight,
        distill_temperature=1.0 if args.distill_temperature is None else args.distill_temperature,
        teacher=args.teacher, teacher_model=args.teacher_model,
    )


def _refuse_unused(args, method: str, mode: str) -> None:
    """Refuse the DTEM-only flags where the run would not read them (it would train with the
    defaults of what it does read, while the flags looked applied)."""
    from ..training import unused_settings

    unused = unused_settings(method, mode)
    flags = {"backbone_lr": "--backbone-lr", "tau": "--tau", "embed_dim": "--embed-dim", "hidden_dim": "--hidden-dim"}
    given = [flag for name, flag in flags.items() if name in unused and getattr(args, name) is not None]
    if not given:
        return
    if method != "dtem":
        lr = " (the ViT's learning rate is --lr)" if "--backbone-lr" in given else ""
        named = ", ".join(given)
        raise ValueError(f"{named} {'set' if len(given) > 1 else 'sets'} up --method dtem; --method {method} has "
                         f"no merge embeddings and trains only the ViT, at --lr: drop {named}{lr}")
    if "--backbone-lr" in given:
        raise ValueError("--backbone-lr is the ViT's learning rate, and --mode modular keeps the ViT frozen "
                         "(only the merge embeddings learn, at --lr): drop it, or train the ViT too with "
                         "--mode end2end")
    raise ValueError("--tau is the temperature of DTEM's soft merge in modular and end2end training; "
                     "--mode backbone merges hard, as at inference: drop it")


def run(args) -> int:
    import torch

    from ..training import train

    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    if summary.get("accuracy"):
        print(json.dumps({"accuracy": summary["accuracy"], "train_seconds": round(summary["train_seconds"], 1)}))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenmerge.commands.train")
    _configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
