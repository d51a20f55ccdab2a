"""`blip2` command line: one function per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

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
    from blip2.train.loop import train

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    if not recipe.data.train:
        raise SystemExit("data.train is empty: set it in the recipe or with --set data.train=PATH")
    summary = train(recipe, args.out)
    if "rank" not in summary:  # under torchrun only the main process reports
        print(json.dumps(summary.get("retrieval", summary), indent=2))
    return 0


def _train_generative(recipe: Any, out: str) -> int:
    """Train a stage-2 or SCST recipe and print its caption metrics."""
    from blip2.train.loop import train

    if not recipe.data.train:
        raise SystemExit("data.train is empty: set it in the recipe or with --set data.train=PATH")
    summary = train(recipe, out)
    if "rank" not in summary:  # under torchrun only the main process reports
        print(json.dumps({k: v for k, v in summary.get("generation", summary).items() if "examples" not in k},
                         indent=2))
    return 0


def cmd_train_stage2(args: argparse.Namespace) -> int:
    from blip2.config import Stage2Recipe, load_recipe

    overrides = list(args.set) + ([f"stage2.init={args.init}"] if args.init else [])
    return _train_generative(load_recipe(resolve_recipe(args.recipe), overrides, Stage2Recipe), args.out)


def cmd_train_scst(args: argparse.Namespace) -> int:
    from blip2.config import Stage2Recipe, load_recipe

    recipe = load_recipe(resolve_recipe(args.recipe), [*args.set, f"stage2.init={args.init}"], Stage2Recipe)
    return _train_generative(recipe.as_scst(), args.out)  # a plain stage-2 recipe: SCST with the defaults


def cmd_train_pipeline(args: argparse.Namespace) -> int:
    from blip2.config import PipelineRecipe, load_recipe
    from blip2.train.loop import train_pipeline

    recipe = load_recipe(resolve_recipe(args.recipe), args.set, PipelineRecipe)
    summary = train_pipeline(recipe, args.out)
    if "rank" in summary["stage2"]:  # under torchrun only the main process reports
        return 0
    # each stage's (and ensemble's) headline numbers (in full in its summary.json), and the rest as is
    brief = {k: {kk: vv for kk, vv in v.items() if kk in ("retrieval", "generation", "steps", "models")}
             if k.split("/")[-1] in ("stage1", "stage2", "scst", "ensemble") else v for k, v in summary.items()}
    print(json.dumps(brief, indent=2, default=str))
    return 0


def _load(path: str, device: str = "cpu", precision: str | None = None):
    """A model directory (ours or transformers BLIP-2) on `device`, in eval mode."""
    from blip2.model import Blip2, resolve_device, resolve_precision, warn_slow_half

    dev = resolve_device(device)
    model = Blip2.from_dir(path, precision=resolve_precision(precision, dev) if precision else None)
    warn_slow_half(dev, model.cfg.frozen_precisions)
    return model.to(dev).eval()


def _load_generator(path: str, device: str = "cpu", precision: str | None = None):
    model = _load(path, device, precision)
    if model.llm is None:
        raise SystemExit(f"{path} is a stage-1 model (retrieval/matching only): captioning needs a stage-2 model")
    return model


def _load_generator_or_ensemble(args: argparse.Namespace):
    """--model, or with --ensemble DIR... a Blip2Ensemble of --model and those models."""
    from blip2.model import Blip2Ensemble

    model = _load_generator(args.model, args.device, args.precision)
    if not args.ensemble:
        return model
    return Blip2Ensemble([model] + [_load_generator(d, args.device, args.precision) for d in args.ensemble])


def _decode_cfg(args: argparse.Namespace, base):
    import dataclasses

    names = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty",
             "no_repeat_ngram_size", "do_sample", "top_p", "temperature", "seed", "static_cache")
    fields = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if fields.get("do_sample") and "num_beams" not in fields:
        fields["num_beams"] = 1
    return dataclasses.replace(base, **fields)


def cmd_caption(args: argparse.Namespace) -> int:
    from blip2.tasks import CAPTION_DECODE, image_features

    model = _load_generator_or_ensemble(args)
    decode = _decode_cfg(args, CAPTION_DECODE)
    for path in args.images:
        text = model.generate(image_features(model, [path]), [args.prompt], decode)[0]
        print(f"{path}\t{(args.prompt + ' ' + text).strip()}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from blip2.tasks import VQA_DECODE, image_features, rank_options, vqa_prompt

    model = _load_generator(args.model, args.device, args.precision)
    feats = image_features(model, [args.image])
    prompt = vqa_prompt(model.llm, args.question)
    if args.options:
        options = [o.strip() for o in args.options.split(",") if o.strip()]
        scores = rank_options(model, feats, [prompt], options)[0]
        for o, sc in sorted(zip(options, scores.tolist(), strict=True), key=lambda x: -x[1]):
            print(f"{o}\t{sc:.3f}")
        return 0
    print(model.generate(feats, [prompt], _decode_cfg(args, VQA_DECODE))[0])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from blip2.tasks import VQA_DECODE, chat_prompt, image_features

    model = _load_generator(args.model, args.device, args.precision)
    feats = image_features(model, [args.image])
    decode = _decode_cfg(args, VQA_DECODE)
    history: list[tuple[str, str]] = []
    print("Ask about the image (empty line or Ctrl-D to quit).", file=sys.stderr)
    for line in sys.stdin:
        question = line.strip()
        if not question:
            break
        answer = model.generate(feats, [chat_prompt(model.llm, history, question)], decode)[0]
        history.append((question, answer))
        print(answer, flush=True)
    return 0


def cmd_eval_caption(args: argparse.Namespace) -> int:
    from blip2.config import CaptionEvalConfig
    from blip2.eval.caption import evaluate_generation
    from blip2.tasks import CAPTION_DECODE

    model = _load_generator_or_ensemble(args)
    cfg = CaptionEvalConfig(max_images=args.max_images, batch_size=args.batch_size,
                            decode=_decode_cfg(args, CAPTION_DECODE))
    result = evaluate_generation(model, args.data, args.images, args.split, cfg, args.cache_dir, args.workers,
                                 progress=not args.json, prompt=args.prompt, predictions=args.predictions)
    _print_result(result, args.json)
    return 0


def cmd_eval_vqa(args: argparse.Namespace) -> int:
    from blip2.eval.vqa import evaluate_vqa, load_questions
    from blip2.tasks import VQA_DECODE

    model = _load_generator(args.model, args.device, args.precision)
    questions = load_questions(args.data, args.images, args.split)[: args.max_questions]
    options = [o.strip() for o in args.options.split(",")] if args.options else None
    result = evaluate_vqa(model, questions, _decode_cfg(args, VQA_DECODE), args.batch_size, options,
                          cache_dir=args.cache_dir, num_workers=args.workers, progress=not args.json,
                          predictions=args.predictions)
    _print_result(result, args.json)
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from blip2.eval.significance import compare_prediction_files, format_comparison

    result = compare_prediction_files(args.a, args.b, args.resamples, args.seed)
    print(json.dumps(result) if args.json else format_comparison(result))
    return 0


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        if isinstance(v, float):
            print(f"{k:14s} {v:7.2f}")
        elif not isinstance(v, list):
            print(f"{k:14s} {v}")
    for ex in result.get("examples", [])[:5]:
        print(json.dumps(ex))


def _recipe_args(p: argparse.ArgumentParser, set_example: str, out_help: str) -> None:
    p.add_argument("--recipe", required=True, help="YAML recipe file or packaged recipe name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe field, {set_example} (repeatable)")
    p.add_argument("--out", required=True, help=out_help)


def _decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (defaults: the paper's setting for the task)")
    g.add_argument("--num-beams", dest="num_beams", type=int)
    g.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    g.add_argument("--min-new-tokens", dest="min_new_tokens", type=int)
    g.add_argument("--length-penalty", dest="length_penalty", type=float)
    g.add_argument("--repetition-penalty", dest="repetition_penalty", type=float)
    g.add_argument("--no-repeat-ngram-size", dest="no_repeat_ngram_size", type=int)
    g.add_argument("--sample", dest="do_sample", action="store_const", const=True,
                   help="nucleus sampling instead of beam search (sets --num-beams 1)")
    g.add_argument("--top-p", dest="top_p", type=float)
    g.add_argument("--temperature", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--static-cache", dest="static_cache", choices=("auto", "on", "off"),
                   help="preallocated KV cache + one CUDA graph per decode step (auto: on for a decoder-only "
                        "LM on a GPU)")


def _ensemble_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", action="append", default=[], metavar="DIR",
                   help="another stage-2 model to decode together with --model (repeatable): each step follows "
                        "the models' mean next-token probability; the LLMs must share one vocabulary")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (cuda when available)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16", "auto"), default=None,
                   help="precision of the frozen image encoder and LLM (default: as saved; fp16/bf16 halve "
                        "their memory on a GPU, the Q-Former stays fp32; auto: bf16 where the device computes "
                        "it natively, fp16 on a GPU without bf16, fp32 otherwise)")


def _data_args(p: argparse.ArgumentParser, data_help: str) -> None:
    _device_arg(p)
    p.add_argument("--model", required=True, help="model directory (model.safetensors + config.json)")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--images", default=None, help="image root (default: images/ beside --data)")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", default=None, help="feature cache root (default ~/.cache/blip2/features)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_eval_retrieval(args: argparse.Namespace) -> int:
    from blip2.config import EvalConfig
    from blip2.eval.retrieval import evaluate_split

    model = _load(args.model, args.device, args.precision)
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


def cmd_shards(args: argparse.Namespace) -> int:
    from blip2.data.shards import write_shards_from

    report = write_shards_from(args.data, args.out, args.images, args.split, args.maxcount)
    print(json.dumps({k: v for k, v in report.items() if k != "shards"} | {"num_shards": len(report["shards"])}))
    return 0


def cmd_yesno(args: argparse.Namespace) -> int:
    from blip2.data.yesno import add_yesno_questions

    report = add_yesno_questions(args.data, args.out, args.per_image, args.negatives, args.seed)
    print(json.dumps(report, indent=1))
    return 0


def cmd_capfilt(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from blip2.capfilt import CapFiltConfig, run_capfilt
    from blip2.train.distributed import World

    world = World.from_env()
    # CapFiltConfig's sampling defaults (length limits) with the command line's nucleus settings
    sampling = replace(CapFiltConfig().sampling, top_p=args.top_p, temperature=args.temperature)
    cfg = CapFiltConfig(num_samples=args.num_samples, top_k=args.top_k, sampling=sampling, prompt=args.prompt,
                        use_itm=args.itm, seed=args.seed)
    captioner = _load(args.model, args.device, args.precision)
    scorer = _load(args.scorer, args.device, args.precision) if args.scorer else captioner
    report = run_capfilt(captioner, scorer, args.data, args.out, cfg, args.images, args.split, world.rank,
                         world.world_size, wait_for_ranks=world.barrier)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if k not in ("examples", "skipped", "config")}, indent=2))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from blip2.quickstart import run_quickstart

    sizes = {k: v for k, v in (("n_train", args.train_images), ("n_val", args.val_images)) if v is not None}
    seed = (f"train.seed={args.seed}",) if args.seed is not None else ()
    summary = run_quickstart(args.out, steps=args.steps, stage2_steps=args.stage2_steps, extra=seed,
                             extra_stage2=seed, **sizes)
    gen = {k: v for k, v in summary["generation"].items() if "examples" not in k}
    print(json.dumps({"retrieval": summary["retrieval"], "generation": gen}, indent=2))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from blip2.retrieval import embed_gallery, itc_similarity, rerank
    from blip2.tasks import image_features

    model = _load(args.model, args.device, args.precision)
    if not model.cfg.qformer.text_branch:
        raise SystemExit(f"{args.model} has no Q-Former text branch (a captioning-only checkpoint): retrieval "
                         "needs a stage-1 / Blip2ForImageTextRetrieval model")
    feats = image_features(model, args.images)
    gallery = embed_gallery(model, feats, args.texts)
    sim = itc_similarity(gallery.image_itc, gallery.text_itc)  # (N_img, N_txt)
    i2t, t2i = (sim, sim.t()) if args.k == 0 else rerank(model, sim, feats, gallery, args.k, progress=False)
    result = {"texts_for_image": {}, "images_for_text": {}}
    for i, path in enumerate(args.images):
        order = [j for j in i2t[i].argsort(descending=True).tolist() if i2t[i, j] > float("-inf")]
        result["texts_for_image"][path] = [(args.texts[j], round(float(i2t[i, j]), 4)) for j in order]
    for j, text in enumerate(args.texts):
        order = [i for i in t2i[j].argsort(descending=True).tolist() if t2i[j, i] > float("-inf")]
        result["images_for_text"][text] = [(args.images[i], round(float(t2i[j, i]), 4)) for i in order]
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for path, ranked in result["texts_for_image"].items():
        print(path)
        for text, score in ranked:
            print(f"  {score:8.4f}  {text}")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from blip2.attention_maps import attention_stats, cross_attention, plot_attention
    from blip2.tasks import CAPTION_DECODE, image_features
    from blip2.vision.transforms import load_rgb

    model = _load(args.model, args.device, args.precision)
    out = Path(args.out)
    for path in args.images:
        feats = image_features(model, [path])
        maps = cross_attention(model, feats)  # (L, 1, H, Q, N)
        if not -len(maps) <= args.layer < len(maps):
            raise SystemExit(f"--layer {args.layer}: this Q-Former has {len(maps)} cross-attention layers")
        title = Path(path).name
        if model.llm is not None:  # what it says next to where it looks
            title += ": " + model.generate(feats, [""], CAPTION_DECODE)[0]
        size = model.vision.preprocess.size
        png = plot_attention(load_rgb(path).resize((size, size)), maps[args.layer, 0].cpu(),
                             out / f"{Path(path).stem}.attention.png", title)
        stats = attention_stats(maps[args.layer, 0])
        print(f"{path}\t{png}\tentropy {stats['entropy']:.2f} of {stats['uniform_entropy']:.2f} (uniform), "
              f"queries correlate {stats['query_correlation']:.2f}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from blip2.average import average_models

    meta = average_models(args.models, args.out, args.weights)
    print(json.dumps({"out": args.out, "averaged_from": meta["averaged_from"], "weights": meta["average_weights"]}))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from blip2.interop.hf import is_hf_dir, load_hf, save_hf
    from blip2.model import Blip2

    src, dst = Path(args.src), Path(args.dst)
    if src.resolve() == dst.resolve():
        raise SystemExit("IN and OUT are the same directory: write the converted model somewhere else")
    if args.from_format == "lavis":
        import tempfile

        from blip2.interop.lavis import convert_lavis

        kw = {"llm": args.llm, "vision": args.vision, "vision_heads": args.vision_heads,
              "qformer_heads": args.qformer_heads}
        if args.to_format == "ours":  # OUT/model (+ OUT/vision for the converted EVA ViT)
            convert_lavis(src, dst, **kw)
            print(json.dumps({"from": str(src), "to": str(dst / "model"), "format": "blip2"}))
            return 0
        with tempfile.TemporaryDirectory() as tmp:
            written = save_hf(convert_lavis(src, Path(tmp) / "ours", **kw), dst)
        print(json.dumps({"from": str(src), "to": str(dst), "format": written}))
        return 0
    if args.from_format == "hf":
        if not is_hf_dir(src):
            raise SystemExit(f"{src} is not a transformers BLIP-2 directory (config.json with model_type blip-2)")
        model = load_hf(src)
    else:
        if is_hf_dir(src):
            raise SystemExit(f"{src} is a transformers BLIP-2 directory: use --from hf")
        model = Blip2.from_dir(src)
    if args.to_format == "hf":
        written = save_hf(model, dst)
    else:
        # ours: trainable weights + config; the frozen tower and LLM are referenced where they are
        model.save(dst, meta={**model.meta, "converted_from": f"{args.from_format}:{src}"})
        written = "blip2"
    print(json.dumps({"from": str(src), "to": str(dst), "format": written}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blip2", description="BLIP-2: Q-Former pretraining, retrieval and more.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="stage", required=True)
    s1 = train.add_parser("stage1", help="stage-1 representation learning (ITC + ITM + ITG)")
    _recipe_args(s1, "e.g. --set train.steps=100", "run directory (resumes from its last checkpoint)")
    s1.set_defaults(func=cmd_train_stage1)
    s2 = train.add_parser("stage2", help="stage-2 generative learning through a frozen LLM")
    _recipe_args(s2, "e.g. --set train.lr=3e-4", "run directory (resumes from its last checkpoint)")
    s2.add_argument("--init", default=None, help="stage-1 model directory to start from (omit: no stage 1)")
    s2.set_defaults(func=cmd_train_stage2)
    sc = train.add_parser("scst", help="self-critical fine-tuning of a stage-2 model on CIDEr-D (after BLIP-2)")
    _recipe_args(sc, "e.g. --set scst.samples=5 --set train.steps=300", "run directory (resumes)")
    sc.add_argument("--init", required=True, help="stage-2 model directory to fine-tune")
    sc.set_defaults(func=cmd_train_scst)
    pl = train.add_parser("pipeline", help="stage 1, then stage 2 from its model (recipe with stage1: and stage2:)")
    _recipe_args(pl, "e.g. --set stage2.train.steps=100 or --set run_stage1=false",
                 "run directory (stage1/ and stage2/ inside; resumes)")
    pl.set_defaults(func=cmd_train_pipeline)

    c = sub.add_parser("caption", help="caption images with a stage-2 model")
    c.add_argument("--model", required=True)
    _device_arg(c)
    c.add_argument("images", nargs="+")
    c.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photo of"')
    _ensemble_arg(c)
    _decode_args(c)
    c.set_defaults(func=cmd_caption)

    a = sub.add_parser("ask", help="answer a question about an image (zero-shot VQA)")
    a.add_argument("--model", required=True)
    _device_arg(a)
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--options", default=None, help="comma-separated closed set (e.g. yes,no): rank by likelihood")
    _decode_args(a)
    a.set_defaults(func=cmd_ask)

    ch = sub.add_parser("chat", help="multi-turn chat about an image (reads questions from stdin)")
    ch.add_argument("--model", required=True)
    _device_arg(ch)
    ch.add_argument("image")
    _decode_args(ch)
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="evaluate a model").add_subparsers(dest="task", required=True)
    r = ev.add_parser("retrieval", help="image-text retrieval recall@1/5/10 (TR and IR)")
    r.add_argument("--model", required=True, help="model directory (model.safetensors + config.json)")
    _device_arg(r)
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

    ec = ev.add_parser("caption", help="BLEU-1..4, METEOR, ROUGE-L, CIDEr on a split")
    _data_args(ec, "Karpathy JSON or JSONL captions")
    ec.add_argument("--prompt", default="")
    ec.add_argument("--max-images", type=int, default=None)
    ec.add_argument("--predictions", default=None, metavar="JSONL",
                    help="write every generated caption with its references to this file")
    _ensemble_arg(ec)
    _decode_args(ec)
    ec.set_defaults(func=cmd_eval_caption)

    ev_vqa = ev.add_parser("vqa", help="VQA accuracy (and yes/no F1) on a question file")
    _data_args(ev_vqa, "questions: {'questions': [...]} JSON, JSONL, or Karpathy JSON with qa lists")
    ev_vqa.add_argument("--options", default=None, help="comma-separated closed set ranked by likelihood")
    ev_vqa.add_argument("--max-questions", type=int, default=None)
    ev_vqa.add_argument("--predictions", default=None, metavar="JSONL",
                        help="write every answer with its question and references (and option scores) to this file")
    _decode_args(ev_vqa)
    ev_vqa.set_defaults(func=cmd_eval_vqa)

    cmp_ = ev.add_parser("compare", help="is caption model A better than B? paired bootstrap of two --predictions "
                         "files (BLEU-1..4, ROUGE-L, CIDEr intervals for A - B)")
    cmp_.add_argument("a", help="predictions JSONL of model A (blip2 eval caption --predictions)")
    cmp_.add_argument("b", help="predictions JSONL of model B, same images in the same order")
    cmp_.add_argument("--resamples", type=int, default=2000)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--json", action="store_true", help="print one JSON object")
    cmp_.set_defaults(func=cmd_eval_compare)

    sc = sub.add_parser("scenes", help="write the procedural shapes dataset")
    sc.add_argument("--out", required=True)
    sc.add_argument("--train", type=int, default=2000)
    sc.add_argument("--val", type=int, default=200)
    sc.add_argument("--size", type=int, default=224)
    sc.add_argument("--seed", type=int, default=0)
    sc.set_defaults(func=cmd_scenes)

    sh = sub.add_parser("shards", help="pack annotations + images into WebDataset tar shards (any --data "
                        "command accepts the shard directory afterwards)")
    sh.add_argument("--data", required=True, help="Karpathy JSON or JSONL annotations")
    sh.add_argument("--images", default=None, help="image root (default: as the training commands)")
    sh.add_argument("--split", default=None, help="pack one split (default: all, each sample keeps its split)")
    sh.add_argument("--out", required=True, help="output directory (shard-000000.tar, ..., shards.json)")
    sh.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    sh.set_defaults(func=cmd_shards)

    yn = sub.add_parser("yesno", help="derive POPE-style yes/no object questions from captions (a Karpathy JSON "
                        "whose images carry 'qa' lists, for stage2.use_qa training and eval vqa)")
    yn.add_argument("--data", required=True, help="Karpathy JSON with captions")
    yn.add_argument("--out", required=True, help="output Karpathy JSON (images resolve as --data's: pass the "
                    "image folder as --images / data.images when it is written elsewhere)")
    yn.add_argument("--per-image", type=int, default=3, help="'yes' questions per image (and as many 'no')")
    yn.add_argument("--negatives", choices=("frequency", "random"), default="frequency",
                    help="absent categories drawn by how often images name them (balanced per category) "
                    "or uniformly (POPE's random setting)")
    yn.add_argument("--seed", type=int, default=0)
    yn.set_defaults(func=cmd_yesno)

    cf = sub.add_parser("capfilt", help="bootstrap captions: sample synthetic ones, keep the top-k by ITC/ITM score")
    cf.add_argument("--model", required=True, help="captioner (a stage-2 model)")
    _device_arg(cf)
    cf.add_argument("--scorer", default=None, help="filter model with ITC/ITM heads (default: --model)")
    cf.add_argument("--data", required=True, help="Karpathy JSON, JSONL or shard directory")
    cf.add_argument("--images", default=None)
    cf.add_argument("--split", default=None)
    cf.add_argument("--out", required=True, help="writes dataset.json, report.json, parts/ (resumable)")
    cf.add_argument("--num-samples", type=int, default=5, help="synthetic captions sampled per image")
    cf.add_argument("--top-k", type=int, default=2, help="captions kept per image")
    cf.add_argument("--top-p", type=float, default=0.9)
    cf.add_argument("--temperature", type=float, default=1.0)
    cf.add_argument("--prompt", default="", help="prompt before each sampled caption, e.g. 'a photo of'")
    cf.add_argument("--itm", action="store_true", help="score with ITM match probability instead of ITC")
    cf.add_argument("--seed", type=int, default=0)
    cf.set_defaults(func=cmd_capfilt)

    rt = sub.add_parser("retrieve", help="rank captions for images and images for captions (ITC, then ITM)")
    rt.add_argument("--model", required=True)
    _device_arg(rt)
    rt.add_argument("--images", nargs="+", required=True)
    rt.add_argument("--texts", nargs="+", required=True)
    rt.add_argument("--k", type=int, default=16, help="ITM re-ranks the top k ITC candidates (0 = ITC only)")
    rt.add_argument("--json", action="store_true")
    rt.set_defaults(func=cmd_retrieve)

    at = sub.add_parser("attention", help="plot where the Q-Former's queries look in each image (cross-attention)")
    at.add_argument("--model", required=True)
    _device_arg(at)
    at.add_argument("images", nargs="+")
    at.add_argument("--out", default="attention", help="folder for the PNGs (one per image)")
    at.add_argument("--layer", type=int, default=-1,
                    help="which cross-attention layer, counted among those that have one (default: the last)")
    at.set_defaults(func=cmd_attention)

    cv = sub.add_parser("convert", help="convert a model between our format and transformers' BLIP-2 classes")
    cv.add_argument("--from", dest="from_format", choices=("hf", "lavis", "ours"), required=True)
    cv.add_argument("--to", dest="to_format", choices=("hf", "ours"), required=True)
    cv.add_argument("src", metavar="IN", help="model directory, or a LAVIS .pth/.safetensors file")
    cv.add_argument("dst", metavar="OUT")
    cv.add_argument("--llm", default=None, help="LAVIS stage-2 files: the transformers directory of their LLM")
    cv.add_argument("--vision", default=None, help="LAVIS files without visual_encoder.*: a vision tower directory")
    cv.add_argument("--vision-heads", type=int, default=None, help="EVA ViT heads (default: 16 for ViT-g)")
    cv.add_argument("--qformer-heads", type=int, default=None, help="Q-Former heads (default: width / 64)")
    cv.set_defaults(func=cmd_convert)

    av = sub.add_parser("average", help="average the weights of models fine-tuned from one start point "
                                        "(e.g. SCST runs of several seeds): one model, no inference cost")
    av.add_argument("models", nargs="+", metavar="MODEL_DIR")
    av.add_argument("--out", required=True, help="a new directory for the averaged model")
    av.add_argument("--weights", type=float, nargs="+", default=None, help="one per model (default: equal)")
    av.set_defaults(func=cmd_average)

    q = sub.add_parser("quickstart", help="the embedded default job: scenes -> stage 1 -> retrieval -> "
                                          "stage 2 -> captions and answers")
    q.add_argument("--out", required=True)
    q.add_argument("--steps", type=int, default=None, help="override stage-1 steps (default: recipe)")
    q.add_argument("--stage2-steps", type=int, default=None, help="override stage-2 steps (default: recipe)")
    q.add_argument("--train-images", type=int, default=None, help="training scenes (default 1000)")
    q.add_argument("--val-images", type=int, default=None, help="held-out scenes (default 200)")
    q.add_argument("--seed", type=int, default=None, help="train.seed of both stages (default: the recipes', 42)")
    q.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
