"""``hf-cifd``: the command line.

Subcommands
  demo           the whole CIFD pipeline on sklearn's digits, offline (``make demo``)
  cache-teacher  run a teacher once over a dataset and store its outputs per sample key
  train-rdms     train N rate-distortion modules at different rates from a teacher cache
  distill        a classification distillation run (the recipes' pipeline; every DistillationConfig flag, --config)
  eval           zero-shot classification and image<->text retrieval of an open_clip model
  push           upload an exported student / RDM folder (only its loadable files) to the Hugging Face Hub
  cost           training cost (MACs) of KD, CIFD, TAKD and DGKD, counted on the meta device (Fig. 1b, D.2)

Bad input and an unreachable Hub end in one line on stderr ("hf-cifd <command>: error: ...") and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys


def _demo(sub):
    from .demo import add_arguments, run_from_args

    p = sub.add_parser("demo", help="CIFD end to end on sklearn's digits (offline, ~3 min on 2 CPU cores)")
    add_arguments(p)
    p.set_defaults(run=run_from_args)


def _add_data_arguments(p, task="classification"):
    p.add_argument("--dataset", required=True,
                   help="Hub id (timm/imagenet-1k-wds, ILSVRC/imagenet-1k, pixparse/cc12m-wds) or a builder "
                        "(webdataset, imagefolder, parquet) with --data_files")
    p.add_argument("--data_files", nargs="*", default=None, help="local files / globs for a builder")
    p.add_argument("--split", default="train")
    p.add_argument("--no_streaming", action="store_true", help="load map-style instead of streaming")
    p.add_argument("--image_column", default=None)
    p.add_argument("--label_column", default=None)
    p.add_argument("--key_column", default=None)
    p.add_argument("--task", default=task, choices=["classification", "image-text"])
    p.add_argument("--max_samples", type=int, default=None, help="stop after this many samples (quick runs)")


def _cache_teacher(sub):
    p = sub.add_parser("cache-teacher", help="run the teacher once per sample and store embeddings + logits")
    p.add_argument("--teacher", required=True,
                   help="model id: timm:<name>, hf:<repo or dir>, cnn:<Table 8 name or dir>, e.g. timm:resnet34.a1_in1k")
    p.add_argument("--num_classes", type=int, default=None)
    p.add_argument("--no_pretrained", action="store_true", help="random weights (offline smoke runs)")
    p.add_argument("--output_dir", required=True)
    _add_data_arguments(p)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--shard_size", type=int, default=1024)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--num_workers", type=int, default=2)

    def run(args):
        from accelerate import Accelerator

        from .adapters import adapter_for
        from .data import cache_teacher_outputs, load_image_dataset
        from .adapters import load_model

        teacher = load_model(args.teacher, num_classes=args.num_classes, pretrained=not args.no_pretrained)
        dataset = load_image_dataset(
            args.dataset, task=args.task, data_files=args.data_files, split=args.split,
            streaming=not args.no_streaming, image_column=args.image_column, label_column=args.label_column,
            key_column=args.key_column, transform=adapter_for(teacher).image_transform(teacher, train=False),
            max_samples=args.max_samples)
        report = cache_teacher_outputs(teacher, dataset, args.output_dir, batch_size=args.batch_size,
                                       shard_size=args.shard_size, dtype=args.dtype, num_workers=args.num_workers,
                                       accelerator=Accelerator(), teacher_name=args.teacher)
        print(report.summary())
        return report

    p.set_defaults(run=run)


def _train_rdms(sub):
    p = sub.add_parser("train-rdms", help="train RDMs at several rates from a teacher-output cache")
    p.add_argument("--cache", required=True, help="directory written by `hf-cifd cache-teacher`")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--rates", type=float, nargs="+", default=[1e4, 5e3, 1e3], help="rate weight R of each RDM")
    p.add_argument("--hidden_dims", type=int, nargs="+", default=[512, 512, 512])
    p.add_argument("--distortion", default="smooth_l1", choices=["mse", "smooth_l1"])
    p.add_argument("--epochs", type=float, default=30.0)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--bottleneck_learning_rate", type=float, default=1e-2,
                   help="learning rate of the entropy models that measure the rate (train_rdms' bottleneck_learning_rate)")
    p.add_argument("--eval_fraction", type=float, default=0.05,
                   help="share of the cached samples held out for the reported rate/accuracy (paper: 5%%)")
    p.add_argument("--seed", type=int, default=0)

    def run(args):
        from .data import TeacherCache
        from .rdm_training import CacheKeysDataset, train_rdms

        cache = TeacherCache(args.cache)
        train, held_out = CacheKeysDataset(cache).split(args.eval_fraction, seed=args.seed)
        report = train_rdms(train, teacher_cache=cache, rates=args.rates, eval_dataset=held_out,
                            output_dir=args.output_dir, epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, bottleneck_learning_rate=args.bottleneck_learning_rate,
                            hidden_dims=args.hidden_dims,
                            distortion=args.distortion, seed=args.seed)
        for row in report.metrics:
            print(json.dumps(row))
        print(f"RDMs, rdm_metrics.json and rd_curve.png in {args.output_dir}")
        return report

    p.set_defaults(run=run)


def _distill(sub):
    p = sub.add_parser("distill", help="classification distillation (every DistillationConfig / recipe flag)",
                       add_help=False)
    p.set_defaults(run=None)


def _eval(sub):
    p = sub.add_parser("eval", help="zero-shot top-1/5 and retrieval R@1/5/10 of an open_clip model")
    p.add_argument("--model", required=True, help="open_clip spec: local-dir:PATH, hf-hub:org/name, or a name")
    p.add_argument("--pretrained", default=None, help="pretrained tag for a built-in name (e.g. openai)")
    p.add_argument("--zeroshot", default=None, help="dataset: local webdataset dir or Hub id (clip-benchmark/wds_*)")
    p.add_argument("--retrieval", default=None, help="dataset with captions (e.g. clip-benchmark/wds_flickr30k)")
    p.add_argument("--classnames", default=None, help="classnames.txt (default: the dataset's, or ImageNet's)")
    p.add_argument("--templates", default=None, help="zeroshot_classification_templates.txt")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--output", default=None, help="write the metrics as JSON here")

    def run(args):
        from .adapters.open_clip import create_openclip
        from .eval.clip import evaluate_clip

        if not (args.zeroshot or args.retrieval):
            raise SystemExit("hf-cifd eval: give --zeroshot and/or --retrieval.")
        model, _, preprocess, tokenizer = create_openclip(args.model, args.pretrained)
        metrics = evaluate_clip(model.eval(), preprocess, tokenizer, args.zeroshot, args.retrieval,
                                classnames=args.classnames, templates=args.templates, batch_size=args.batch_size,
                                max_samples=args.max_samples)
        print(json.dumps(metrics, indent=2))
        if args.output:
            with open(args.output, "w") as f:
                json.dump(metrics, f, indent=2)
        return metrics

    p.set_defaults(run=run)


def _push(sub):
    p = sub.add_parser("push", help="upload an exported student or RDM folder (only its loadable files) to the Hub")
    p.add_argument("folder", help="a folder written by save_model / save_pretrained / train_rdms (e.g. <output_dir>/student "
                                  "or <output_dir>/rdms); a training output or checkpoint folder is refused")
    p.add_argument("--repo_id", required=True, help="org/name on the Hub")
    p.add_argument("--private", action="store_true")
    p.add_argument("--commit_message", default="Upload with hf-cifd")

    def run(args):
        from .hub import push_folder

        # The token comes from HF_TOKEN or `hf auth login`; it is never printed or saved here.
        info, staged = push_folder(args.folder, args.repo_id, private=args.private or None,
                                   commit_message=args.commit_message)
        print(f"uploaded {len(staged)} files of {args.folder} ({', '.join(staged)}) to {args.repo_id}")
        return info

    p.set_defaults(run=run)


def _cost(sub):
    from .cost import add_arguments, run_from_args

    p = sub.add_parser("cost", help="training MACs per method relative to KD (offline, no weights, no data)")
    add_arguments(p)
    p.set_defaults(run=run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-cifd", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in (_demo, _cache_teacher, _train_rdms, _distill, _eval, _push, _cost):
        add(sub)
    return parser


def main(argv=None) -> int:
    """The console entry point; returns the process exit code (0 on success, errors raise)."""
    from .checks import DistillationInputError

    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        if command == "distill":
            # Every DistillationConfig (TrainingArguments) and RecipeArguments flag, parsed by HfArgumentParser.
            from .pipeline import main as distill_main

            distill_main(argv[1:])
        else:
            args = build_parser().parse_args(argv)
            args.run(args)
    except DistillationInputError as e:  # a user error (or no Hub): one line, no traceback
        print(f"hf-cifd {command}: error: {e}", file=sys.stderr)
        return 1
    from .distributed import shutdown

    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
