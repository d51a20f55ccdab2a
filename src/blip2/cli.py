"""`blip2` command line: one function per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

RECIPES = Path(__file__).parent / "recipes"


def resolve_recipe(name: str) -> Path:
    """A YAML path, or the name of a packaged recipe (e.g. `flickr8k-stage1`)."""
    p = Path(name)
    if p.is_file():
        return p
    packaged = RECIPES / (name if name.endswith(".yaml") else name + ".yaml")
    if packaged.is_file():
        return packaged
    known = ", ".join(sorted(q.stem for q in RECIPES.glob("*.yaml")))
    raise SystemExit(f"recipe {name!r} not found (not a file; packaged recipes: {known})")


def cmd_train_stage1(args: argparse.Namespace) -> int:
    from blip2.config import load_recipe
    from blip2.train.loop import train_stage1

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    if not recipe.data.train:
        raise SystemExit("data.train is empty: set it in the recipe or with --set data.train=PATH")
    summary = train_stage1(recipe, args.out)
    print(json.dumps(summary.get("retrieval", summary), indent=2))
    return 0


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from blip2.config import EvalConfig
    from blip2.eval.retrieval import evaluate_split
    from blip2.model import Blip2

    model = Blip2.from_dir(args.model)
    cfg = EvalConfig(k_test=args.k, batch_size=args.batch_size, max_images=args.max_images)
    result = evaluate_split(model, args.data, args.images, args.split, cfg, args.cache_dir,
                            args.workers, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"):
            print(f"{key:8s} {result[key]:6.2f}  (ITC only {result['itc_' + key]:6.2f})")
        print(f"{result['num_images']} images, {result['num_texts']} texts, k={result['k_test']}")
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from blip2.data.scenes import write_scenes

    path = write_scenes(args.out, args.train, args.val, args.size, args.seed)
    print(path)
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from blip2.quickstart import run_quickstart

    sizes = {k: v for k, v in (("n_train", args.train_images), ("n_val", args.val_images)) if v is not None}
    summary = run_quickstart(args.out, steps=args.steps, **sizes)
    print(json.dumps(summary["retrieval"], indent=2))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2", description="BLIP-2: Q-Former pretraining, retrieval and more.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="stage", required=True)
    s1 = train.add_parser("stage1", help="stage-1 representation learning (ITC + ITM + ITG)")
    s1.add_argument("--recipe", required=True, help="YAML recipe file or packaged recipe name")
    s1.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field, e.g. --set train.steps=100 (repeatable)")
    s1.add_argument("--out", required=True, help="run directory (resumes from its last checkpoint)")
    s1.set_defaults(func=cmd_train_stage1)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    r = ev.add_parser("retrieval", help="image-text retrieval recall@1/5/10 (TR and IR)")
    r.add_argument("--model", required=True, help="model directory (model.safetensors + config.json)")
    r.add_argument("--data", required=True, help="Karpathy JSON or JSONL annotations")
    r.add_argument("--images", default=None, help="image root (default: images/ beside --data)")
    r.add_argument("--split", default="val")
    r.add_argument("--k", type=int, default=128, help="ITC candidates re-ranked by ITM (0 = ITC only)")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--max-images", type=int, default=None)
    r.add_argument("--cache-dir", default=None, help="feature cache root (default ~/.cache/blip2/features)")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--json", action="store_true", help="print one JSON object")
    r.set_defaults(func=cmd_eval_retrieval)

    sc = sub.add_parser("scenes", help="write the procedural shapes dataset")
    sc.add_argument("--out", required=True)
    sc.add_argument("--train", type=int, default=2000)
    sc.add_argument("--val", type=int, default=200)
    sc.add_argument("--size", type=int, default=224)
    sc.add_argument("--seed", type=int, default=0)
    sc.set_defaults(func=cmd_scenes)

    q = sub.add_parser("quickstart", help="the embedded default job: scenes -> stage 1 -> retrieval report")
    q.add_argument("--out", required=True)
    q.add_argument("--steps", type=int, default=None, help="override training steps (default: recipe)")
    q.add_argument("--train-images", type=int, default=None, help="training scenes (default 1500)")
    q.add_argument("--val-images", type=int, default=None, help="held-out scenes (default 200)")
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
