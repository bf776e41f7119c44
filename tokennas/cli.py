"""The `tokennas` command line: spaces, presets, flops, search, export, report, train, evaluate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Neural architecture search over the token schedules of vision transformers.")
console = Console()
# typer vendors click; its usage errors share this base class.
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
RECIPE_HELP = ("default: the short recipe tuned for searches; deit (long GPU-scale runs): DeiT's training with timm's "
               "pieces: Mixup/CutMix into soft targets with label smoothing 0.1 (timm's SoftTargetCrossEntropy), and "
               "on image folders and timm datasets RandAugment (rand-m9-mstd0.5-inc1), random erasing (0.25) and "
               "bicubic resizing; the embedded Fashion-MNIST gets the random erasing on the device but no "
               "RandAugment (a PIL-image policy). Evaluation is unchanged.")


@app.command()
def presets(as_json: bool = typer.Option(False, "--json", help="Print a JSON list: the presets (kind \"preset\", "
                                         "test_acc null), then the shipped parents (kind \"parent\").")) -> None:
    """List the named paper variants with family, parameters and FLOPs (MACs), and the shipped trained parents
    with their test accuracy."""
    from . import count_flops, list_presets, load_config
    from .config import PRESETS
    from .flops import format_flops
    from .parents import list_parents, parent_info

    rows = []
    for name in list_presets():
        config = load_config(name)
        rows.append({"name": name, "family": config.family, "img_size": config.img_size,
                     "params": config.num_params(), "flops": count_flops(config), "description": PRESETS[name][1],
                     "kind": "preset", "test_acc": None})
    for name in list_parents():
        info = parent_info(name)
        config = info["config"]
        rows.append({"name": name, "family": config.family, "img_size": config.img_size,
                     "params": config.num_params(), "flops": count_flops(config),
                     "description": f"trained parent, for `--parent {name}`",
                     "kind": "parent", "test_acc": info["test_acc"]})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("preset", "family", "img", "params", "FLOPs", "test acc", "what it is", title="tokennas presets")
    kind = "preset"
    for r in rows:
        if r["kind"] != kind:  # the shipped parents, in a section below the paper presets
            table.add_section()
            kind = r["kind"]
        table.add_row(r["name"], r["family"], str(r["img_size"]), f"{r['params'] / 1e6:.2f}M",
                      format_flops(r["flops"]), "" if r["test_acc"] is None else f"{r['test_acc']:.4f}",
                      r["description"])
    console.print(table)


@app.command()
def flops(
    name: str = typer.Argument(..., help="A preset name or a config .yaml/.json file."),
    method: str = typer.Option("analytic", help="analytic (closed form) or fvcore (traced)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """FLOPs (multiply-accumulates) and parameters of a preset or config, per module."""
    from .config import load_config
    from .flops import METHODS, flops_by_module, format_flops

    config = load_config(name)
    if method not in METHODS:
        raise ValueError(f"invalid --method {method!r}; expected one of: {', '.join(METHODS)}")
    per_module = flops_by_module(config, method)
    total = sum(per_module.values())
    if as_json:
        print(json.dumps({"name": name, "family": config.family, "img_size": config.img_size,
                          "flops": total, "params": config.num_params()}))
        return
    table = Table("module", "FLOPs", "share", title=f"{name} ({config.family}, {config.img_size}px, {method})")
    for module, value in per_module.items():
        table.add_row(module, format_flops(value), f"{100 * value / total:.1f}%")
    table.add_row("total", format_flops(total), "100%", style="bold")
    console.print(table)
    console.print(f"parameters: {config.num_params():,}")


@app.command()
def spaces(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List the search spaces, their dimensions and the size of each."""
    from .spaces import SPACES, Inputs

    inputs = Inputs()
    rows = [{"name": s.name, "description": s.description, "size": s.size(inputs),
             "dimensions": {k: list(v) for k, v in s.dimensions(inputs).items()}} for s in SPACES.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        size = f"{r['size']:,} candidates" if r["size"] else "continuous (rates projected onto the budget)"
        console.print(f"[bold]{r['name']}[/bold]  {size} at {inputs.img_size}px")
        console.print(f"  {r['description']}")
        for dim, choices in r["dimensions"].items():
            long_index = len(choices) > 10 and choices == list(range(len(choices)))  # the tokens space's candidates
            console.print(f"  {dim}: {f'0 to {len(choices) - 1}' if long_index else ', '.join(map(str, choices))}")


@app.command()
def search(
    ctx: typer.Context,
    space: str | None = typer.Option(None, help="Search space: psvit, hvt, ... (see `tokennas spaces`)."),
    flops: str | None = typer.Option(None, help="Hard FLOPs (MACs) budget per image, e.g. 30M or 4G; with --parent "
                                     "also a share of the parent's MACs, e.g. 50%."),
    trials: int = typer.Option(12, help="Candidates to train; over-budget, repeated and failed proposals don't count."),
    epochs: int = typer.Option(3, help="Training epochs per candidate (ASHA may stop weak ones sooner)."),
    objective: str = typer.Option("acc", help="acc: best validation accuracy; pareto: accuracy up, FLOPs down; "
                                  "pareto-latency (frozen strategy): accuracy up, predicted latency at "
                                  "--latency-batch down."),
    sampler: str = typer.Option("tpe", help="Optuna sampler: tpe, nsga2, random or cmaes (CMA-ES over continuous "
                                "parameters: the layers space's rates)."),
    scheduler: str = typer.Option("asha", help="asha (early stopping after the warm-up) or fifo (none)."),
    seed: int = typer.Option(0, help="Seeds the sampler, the data split and the initialisation."),
    sampler_seed: int | None = typer.Option(None, help="Seeds the proposals only (the sampler and its fallback), "
                                            "leaving the data split and the initialisation to --seed: repeats of a "
                                            "search on a --parent, whose split --seed must match [default: --seed]."),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist (embedded), a timm dataset name such as "
                                "torch/cifar10, or folder (an image folder with train/ and validation/)."),
    data_dir: str | None = typer.Option(None, help="Where a non-embedded dataset lives."),
    img_size: int | None = typer.Option(None, help="Input resolution; FLOPs are counted at it [default: the "
                                        "--parent's; else 32 on the embedded data (224 when the budget constrains "
                                        "nothing at 32px), 224 on folders and timm datasets]. A resolution at which "
                                        "the budget constrains nothing is refused."),
    train_subset: int | None = typer.Option(None, help="Train on the first N training images (quick searches)."),
    batch_size: int = typer.Option(64, help="Training batch size (at most the training split)."),
    lr: float = typer.Option(3e-3, help="AdamW learning rate at batch 128 (scaled linearly), > 0."),
    augment: str = typer.Option("auto", help="Training augmentation: auto (light below 64px, timm's ImageNet "
                                "policy from 64px), light, imagenet or none."),
    recipe: str = typer.Option("default", help=RECIPE_HELP),
    gpus_per_trial: float | None = typer.Option(None, help="GPUs per trial, fractions allowed "
                                                   "[default: 1 with CUDA, else 0]."),
    cpus_per_trial: float = typer.Option(1.0, help="CPU cores per trial; also the data-loader processes."),
    time_budget: str | None = typer.Option(None, help="Stop gracefully after this long, e.g. 30m or 2h; cut "
                                           "trials are trained again on --resume."),
    max_failures: int = typer.Option(3, help="Stop the search (exit 1) after this many failed trials."),
    retrain_top: int = typer.Option(3, help="Re-rank: train the top K candidates and the baseline again (0: off)."),
    retrain_epochs: int = typer.Option(6, help="Epochs of each re-ranking run."),
    retrain_seeds: int = typer.Option(2, help="Seeds per re-ranked candidate; the ranking uses their mean."),
    top: int = typer.Option(5, help="How many best configs to export into best/."),
    scorer_weights: str | None = typer.Option(None, help="lcnet_050 weights: puts the quadtree space's `feature` "
                                              "saliency scorer in the search."),
    out: Path | None = typer.Option(None, help="Run folder [default: results/<space>-<timestamp>]."),
    resume: Path | None = typer.Option(None, help="Continue or extend the search in this run folder "
                                       "(with --trials, --time-budget, --max-failures, --retrain-*, --top, "
                                       "--ray-address, --heartbeat)."),
    quiet: bool = typer.Option(False, "--quiet", help="No live table."),
    ray_address: str | None = typer.Option(None, help="local (a private Ray, the default), auto (the cluster "
                                           "`ray start` set up here), HOST:PORT or ray://HOST:PORT."),
    ray_storage: str | None = typer.Option(None, help="Ray Tune's storage_path for trial checkpoints: a shared "
                                           "filesystem or cloud URI (needed on several machines) [default: RUN/ray]."),
    storage: str | None = typer.Option(None, help="Optuna storage: postgresql://USER@HOST/DB, mysql://..., "
                                       "sqlite:///PATH or journal:PATH [default: RUN/study.db]. The password "
                                       "comes from the URL or TOKENNAS_STORAGE_PASSWORD and is never stored."),
    study_name: str = typer.Option("tokennas", help="The study's name in --storage; drivers sharing it cooperate."),
    heartbeat: int = typer.Option(30, help="Seconds between heartbeats on an RDB --storage; a driver silent for "
                                  "twice that is taken as dead and its trials are run again."),
    strategy: str | None = typer.Option(None, help="standalone: every candidate is trained (Ray Tune); oneshot: "
                                        "candidates are scored on a supernet's shared weights, then the top K are "
                                        "trained (psvit, hvt and tokens spaces); frozen: schedules scored on the "
                                        "--parent's own weights (layers space); differentiable: per-block prune "
                                        "and merge rates learned by gradient on the --parent's frozen weights "
                                        "(DiffRate-style, layers space) [default: frozen for layers, else "
                                        "standalone]."),
    parent: str | None = typer.Option(None, help="oneshot, frozen, differentiable: a trained ViT, a shipped "
                                      "parent's name (e.g. fmnist-vit, see `tokennas presets`), a `tokennas train` "
                                      "checkpoint.pt or a timm ViT/DeiT state dict [oneshot default: train a "
                                      "supernet in the run]."),
    supernet_epochs: int | None = typer.Option(None, help="oneshot: epochs of supernet training [default: 6; 0 with "
                                               "a --parent whose classifier fits the data]."),
    finetune_epochs: int = typer.Option(0, help="oneshot: re-rank by fine-tuning the top K from their inherited "
                                        "weights for this many epochs (0: train from scratch, --retrain-epochs); "
                                        "frozen, differentiable: fine-tune the top K from the parent's weights (0: no "
                                        "re-ranking)."),
    score_images: int | None = typer.Option(None, help="oneshot, frozen, differentiable: validation images each "
                                            "candidate is scored on [default: 1000 for frozen, else 2000]."),
    diff_steps: int = typer.Option(200, help="differentiable: optimisation steps of the per-block rates, each on a "
                                   "batch of --batch-size training images."),
    diff_lr: float = typer.Option(0.05, help="differentiable: Adam's learning rate on the rates' logits, "
                                  "cosine-annealed to 0."),
    latency: float | None = typer.Option(None, help="frozen: hard latency budget, milliseconds per forward of "
                                         "--latency-batch images, as predicted by a latency model of the parent "
                                         "measured on this machine (cached); a proposal predicted slower is "
                                         "infeasible, as one over --flops."),
    latency_batch: int = typer.Option(1, help="frozen: the batch size --latency and --objective pareto-latency "
                                      "predict the latency at."),
) -> None:
    """Search a space under a FLOPs budget: Optuna proposes, Ray Tune trains, the best are re-ranked on more
    seeds against the uniform baseline, reports come out."""
    from .search.run import run_search
    from .search.settings import SearchSettings, with_defaults

    # typer may vendor its own click: compare the parameter source by name
    given = {name for name in ctx.params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    options = {k: v for k, v in ctx.params.items() if k not in ("out", "resume", "quiet")}
    if resume is not None:
        if "out" in given:
            raise ValueError("--out cannot be given with --resume; the run folder is the one resumed")
        overrides = {k: options[k] for k in given if k in options}
        run_dir = run_search(None, resume=resume, progress=not quiet, overrides=overrides)
    else:
        if space is None or flops is None:
            raise ValueError("--space and --flops are required (or --resume RUN_DIR)")
        resolved, notice = with_defaults(options)
        if resolved["score_images"] is None:  # the strategy's own default
            from .search.strategies import get_strategy

            resolved["score_images"] = get_strategy(resolved["strategy"]).score_images
        if notice:
            console.print(notice)
        run_dir = run_search(SearchSettings(**resolved), out=out, progress=not quiet)
    console.print(f"results in {run_dir}: trials.csv, ranking.csv, retrain.csv, best/, pareto.png, report.html, "
                  "summary.md")
    console.print((run_dir / "summary.md").read_text())


def _run_dir(path: Path) -> Path:
    from .search.settings import load_settings

    if not (path / "search.yaml").is_file() or not ((path / "study.db").is_file() or load_settings(path).storage):
        raise ValueError(f"{str(path)!r} is not a tokennas run folder (expected search.yaml and study.db)")
    return path


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A search's run folder."),
    top: int = typer.Option(5, help="How many configs, best first."),
    out: Path = typer.Option(..., help="Folder to write 01-*.yaml, 02-*.yaml... into: new, empty or a previous "
                             "export, whose configs are replaced; nothing else in it is touched."),
) -> None:
    """Export the best configs of a search (its final ranking) from its stored study."""
    from .report.export import export_best
    from .search.settings import load_settings
    from .search.strategies import get_strategy
    from .search.studies.storage import open_run_study

    if top < 1:
        raise ValueError(f"invalid --top {top}; expected at least 1")
    settings = load_settings(_run_dir(run_dir))
    epochs = get_strategy(settings.strategy).retrain_epochs(settings)
    for path in export_best(open_run_study(run_dir, settings), settings.objective, top, out, epochs):
        console.print(str(path))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A search's run folder.")) -> None:
    """Rebuild trials.csv, best/, pareto.png, report.html and summary.md from the stored study."""
    from .report import write_reports

    write_reports(_run_dir(run_dir))
    console.print(f"reports rebuilt in {run_dir}")


@app.command()
def dashboard(
    run_dir: Path = typer.Argument(..., help="A search's run folder."),
    port: int = typer.Option(0, help="Port on 127.0.0.1 [default: a free one, printed]."),
) -> None:
    """Serve Optuna's dashboard over the run's study on 127.0.0.1 (pip install 'tokennas[dashboard]')."""
    from .search.dashboard import dashboard_server

    server = dashboard_server(_run_dir(run_dir), port)
    print(f"optuna-dashboard for {run_dir} at http://127.0.0.1:{server.server_port}/dashboard/ (Ctrl-C stops it)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@app.command()
def train(
    config: str = typer.Argument(..., help="A config .yaml (e.g. from best/) or a preset name."),
    epochs: int = typer.Option(30, help="Training epochs."),
    out: Path = typer.Option(Path("results/train"), help="Folder for metrics.json, history.csv, checkpoint.pt."),
    dataset: str = typer.Option("fashion-mnist", help="As for `tokennas search`."),
    data_dir: str | None = typer.Option(None, help="Where a non-embedded dataset lives."),
    train_subset: int | None = typer.Option(None, help="Train on the first N training images."),
    batch_size: int = typer.Option(64, help="Training batch size."),
    lr: float = typer.Option(3e-3, help="AdamW learning rate at batch 128 (scaled linearly)."),
    seed: int = typer.Option(0, help="Seeds the data split and the initialisation."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    augment: str = typer.Option("auto", help="Training augmentation, as for `tokennas search`: auto, light, imagenet "
                                "or none (e.g. a last, low --lr schedule on clean images for a model that underfits)."),
    recipe: str = typer.Option("default", help=RECIPE_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last finished epoch "
                                "(--out/last.pt, written after every epoch), with the same config and options."),
    init: Path | None = typer.Option(None, help="Start from the weights of this `tokennas train` checkpoint.pt (the "
                                     "same config) instead of a fresh initialisation: a second, shorter schedule, "
                                     "e.g. at a lower --lr."),
) -> None:
    """Train a config for longer, then evaluate it once on the test split. After every epoch the state is kept in
    --out/last.pt, so that a killed run goes on with --resume; it is removed when the run has finished."""
    import math

    import pandas as pd
    import torch

    from .config import load_config
    from .data import AUGMENTS, Batches, load_data, trained_split
    from .train import (
        RESUME_STATE,
        NonFiniteLoss,
        TrainSettings,
        check_compatible,
        check_out,
        evaluate,
        fit,
        initial_weights,
        load_resume_state,
        save_checkpoint,
        trained_on,
        write_atomic,
    )

    model_config = load_config(config)
    checks = [
        (epochs >= 1, f"invalid --epochs {epochs}; expected at least 1"),
        (batch_size >= 1, f"invalid --batch-size {batch_size}; expected at least 1"),
        (math.isfinite(lr) and lr > 0, f"invalid --lr {lr}; expected a positive finite number"),
        (train_subset is None or train_subset >= 10, f"invalid --train-subset {train_subset}; expected at least 10 "
                                                     "images"),
        (augment in AUGMENTS, f"invalid --augment {augment!r}; expected one of: {', '.join(AUGMENTS)}"),
        *_device_checks(device),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, recipe=recipe,
                             augment=augment)
    check_out(out)  # before the training, so that no earlier run is replaced and no hours are lost
    options = {"epochs": epochs, "dataset": dataset, "train_subset": train_subset, "batch_size": batch_size, "lr": lr,
               "seed": seed, "init": str(init) if init else None, "recipe": recipe,
               **({"augment": augment} if augment != "auto" else {})}  # --resume must repeat them
    state = load_resume_state(out, model_config, options) if resume else None
    if not resume and (out / RESUME_STATE).exists():
        raise ValueError(f"--out {str(out)!r} holds an unfinished run ({RESUME_STATE}); continue it with --resume "
                         "or use another --out")
    data = load_data(dataset, data_dir, model_config.img_size, train_subset, seed=seed, with_test=True,
                     augment=augment)
    check_compatible(model_config, data)
    before = trained_on(init) if init and init.is_file() else None  # --init: what its weights trained on
    mixed = before is not None and before.get("dataset") == data.name and before != trained_split(data.name, seed)
    split = trained_split(data.name, None if mixed else seed)  # seed None: no validation split was held out
    history = list(state["history"]) if state else []

    def on_epoch(metrics, epoch_state):
        history.append(metrics)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / RESUME_STATE, lambda path: torch.save({**epoch_state, "history": history,
                                                                  "options": options}, path))
        console.print(f"epoch {metrics['epoch']}/{epochs}  train_loss {metrics['train_loss']:.4f}  "
                      f"val_acc {metrics['val_acc']:.4f}  ({metrics['epoch_seconds']:.0f} s)")

    try:
        model, metrics = fit(model_config, data, settings, on_epoch, resume=state,
                             init=initial_weights(init, model_config) if init and state is None else None)
    except NonFiniteLoss as err:  # a run that failed, not bad input: exit 1, and --out is left untouched
        print(f"error: training diverged: {err}; nothing was written to {str(out)!r}", file=sys.stderr)
        raise typer.Exit(1) from None
    test = evaluate(model, Batches(data.test, 256, model_config.img_size, settings.resolved_device(), shuffle=False,
                                   stats=data.stats))
    out.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no folder behind
    result = {"config": str(config), "epochs": epochs, "val_acc": metrics["val_acc"], "test_acc": test["acc"],
              "test_loss": test["loss"], "flops": sum(model_config.flops_by_module().values()),
              "params": model_config.num_params()}
    write_atomic(out / "history.csv", lambda path: pd.DataFrame(history).to_csv(path, index=False))
    save_checkpoint(model.cpu(), model_config, out / "checkpoint.pt", metrics=result, split=split,
                    data_config=data.data_config)  # the preprocessing timm's resolve_data_config gives back
    write_atomic(out / "metrics.json", lambda path: path.write_text(json.dumps(result, indent=2)))
    (out / RESUME_STATE).unlink(missing_ok=True)
    console.print(f"test accuracy {test['acc']:.4f}; wrote {out}/metrics.json, history.csv, checkpoint.pt")


def _checkpoint(path: Path, shown: str) -> dict:
    """A `tokennas train` checkpoint (or a search's supernet.pt) named as CONFIG: weights plus their config."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (pickle, zip and format errors alike)
        raise ValueError(f"invalid CONFIG {shown!r}: not a PyTorch checkpoint ({type(err).__name__})") from None
    if not (isinstance(state, dict) and "model" in state and "config" in state):
        raise ValueError(f"invalid CONFIG {shown!r}: a checkpoint without a config (a plain state dict?); expected a "
                         f"`tokennas train` checkpoint, or run a config on these weights: CONFIG --parent {shown}")
    return state


@app.command()
def evaluate(
    config: str = typer.Argument(..., help="A preset name, a config .yaml/.json (e.g. a search's best/01-*.yaml), a "
                                 "`tokennas train` checkpoint.pt or a shipped parent's name (see `tokennas presets`); "
                                 "a checkpoint or a parent brings its own weights."),
    parent: str | None = typer.Option(None, help="Run the config on these weights, unchanged (merging, pruning, "
                                      "pooling and sharing need none of their own): a shipped parent's name, a "
                                      "`tokennas train` checkpoint.pt or a timm ViT/DeiT state dict. Required unless "
                                      "CONFIG is a checkpoint or a parent."),
    split: str = typer.Option("val", help="val: the seeded validation split carved from the training data (what a "
                              "search selects on); test: the test split (what `tokennas train` reports)."),
    dataset: str = typer.Option("fashion-mnist", help="As for `tokennas search`."),
    data_dir: str | None = typer.Option(None, help="Where a non-embedded dataset lives."),
    seed: int = typer.Option(0, help="Seeds the validation split: a search with the same --seed validates on it."),
    batch_size: int = typer.Option(256, help="Evaluation batch size."),
    images: int | None = typer.Option(None, help="Evaluate on the first N images of the split only (all by "
                                                 "default)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: config, parent, acc, loss, flops "
                                 "(MACs), params, split, images."),
) -> None:
    """Accuracy, FLOPs (MACs) and parameters of a config running on a parent's weights, without training: e.g. a
    token schedule found by a search, on the trained ViT it was searched over."""
    import torch

    from . import count_flops
    from .config import PRESETS, build_model, config_from_dict, load_config
    from .data import Batches, TensorSplit, check_held_out, load_data
    from .models.supernet import build_supernet, load_parent
    from .parents import is_parent, list_parents, resolve_parent
    from .train import TrainSettings, check_compatible
    from .train import evaluate as evaluate_model

    checks = [
        (split in ("val", "test"), f"invalid --split {split!r}; expected val or test"),
        (images is None or images >= 1, f"invalid --images {images}; expected at least 1"),
        (batch_size >= 1, f"invalid --batch-size {batch_size}; expected at least 1"),
        *_device_checks(device),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    state = None  # the weights CONFIG brings with it, if any
    if config in PRESETS or Path(config).suffix.lower() in (".yaml", ".yml", ".json"):
        model_config = load_config(config)
    elif is_parent(config) or Path(config).is_file():
        state = _checkpoint(resolve_parent(config), config)  # an unbuilt parent is refused by name here
        model_config = config_from_dict(state["config"])
    else:
        raise ValueError(f"invalid CONFIG {config!r}: expected a preset name, a shipped parent's name (shipped: "
                         f"{', '.join(list_parents()) or 'none'}), a .yaml/.json config or a checkpoint.pt file")
    if parent is None and state is None:
        raise ValueError(f"evaluating {config!r} needs --parent: a preset or config file holds no weights; give "
                         "--parent NAME_OR_PATH (a shipped parent, see `tokennas presets`, or a checkpoint)")
    if parent is not None:
        resolve_parent(parent)  # a bad --parent is refused before the data is read
        if model_config.family != "schedule_vit":
            raise ValueError(f"invalid CONFIG {config!r}: a {model_config.family} config; --parent runs schedule_vit "
                             "(ViT token schedule) configs only")

    data = load_data(dataset, data_dir, model_config.img_size, seed=seed, with_test=split == "test")
    check_compatible(model_config, data)
    if parent is None:
        model = build_model(model_config)
        # a search's supernet.pt also holds per-stage tensors its uniform trunk does not use
        model.load_state_dict({k: v for k, v in state["model"].items()
                               if "supernet" not in state or not k.startswith(("stage_pos.", "pool_convs."))})
    else:
        weights = load_parent(parent, model_config.img_size, data.in_chans, data.num_classes)
        if not weights.head_kept:
            raise ValueError(f"invalid --parent {parent!r}: its classifier does not fit dataset {data.name!r} "
                             f"({data.num_classes} classes); evaluating needs a parent trained on the data")
        model = build_supernet([model_config], weights).child_model(model_config)  # raises naming what does not fit
    if split == "val":  # weights that trained on images of this validation split would not be held out
        check_held_out(state.get("split") if parent is None else weights.extras.get("split"), data.name, seed,
                       config if parent is None else f"--parent {parent}")
    held_out = data.test if split == "test" else data.val
    if images is not None:
        if images > len(held_out):
            raise ValueError(f"invalid --images {images}; expected at most {len(held_out)}, the {split} split's size")
        held_out = (TensorSplit(held_out.images[:images], held_out.labels[:images])
                    if isinstance(held_out, TensorSplit) else torch.utils.data.Subset(held_out, range(images)))
    run_on = TrainSettings(device=device).resolved_device()
    result = evaluate_model(model.to(run_on), Batches(held_out, batch_size, model_config.img_size, run_on,
                                                      shuffle=False, stats=data.stats))
    row = {"config": config, "parent": parent, "acc": result["acc"], "loss": result["loss"],
           "flops": count_flops(model_config), "params": model_config.num_params(), "split": split,
           "images": len(held_out)}
    if as_json:
        print(json.dumps(row))
        return
    from .flops import format_flops

    table = Table("config", "parent", "split", "images", "acc", "loss", "FLOPs", "params", title="tokennas evaluate")
    table.add_row(config, parent or "(its own weights)", split, f"{row['images']:,}", f"{row['acc']:.4f}",
                  f"{row['loss']:.4f}", format_flops(row["flops"]), f"{row['params'] / 1e6:.2f}M")
    console.print(table)


def _device_checks(device: str) -> list[tuple[bool, str]]:
    import torch

    return [(device in ("auto", "cpu", "cuda"), f"invalid --device {device!r}; expected auto, cpu or cuda"),
            (device != "cuda" or torch.cuda.is_available(), "invalid --device cuda: CUDA is not available on this "
                                                            "machine; use cpu or auto")]


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors on stderr and exit code 2 for bad input, never a traceback."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="tokennas", standalone_mode=False)
    except UsageError as err:
        if type(err).__name__ == "NoArgsIsHelpError" and err.ctx is not None:
            print(err.ctx.get_help())
            code = 0
        else:
            print(f"error: {err.format_message()}", file=sys.stderr)
            code = 2
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        code = 130
    except ValueError as err:
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        code = 2
    except RuntimeError as err:
        if type(err).__name__ not in ("SearchFailed", "NonFiniteLoss"):  # a run that failed: one line, exit 1
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        code = 1
    except BaseException as err:
        if type(err).__name__ != "Interrupted":  # SIGINT or SIGTERM stopped a search (search/signals.py)
            raise
        print(str(err).splitlines()[0], file=sys.stderr)
        code = err.code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
