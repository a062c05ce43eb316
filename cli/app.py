"""The mixem-fast command line: one thin function per command, calling into the packages (mixem's Python API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mixem.cli.errors import one_line_errors
from mixem.cli.options import Device, ExportFormat, Impl, JsonLog, Method, Preset, Quiet, Seed, app
from mixem.config import EVAL_FEATURES, EVAL_INITS, FEATURE_TYPES, KMEANS_INITS, TRT_PROFILE
from mixem.errors import MixEMError

_errors = one_line_errors  # every command: one line for any error, the traceback only with --debug


@app.command()
@_errors
def train(
    data: Annotated[
        str | None,
        typer.Argument(
            help="Image folder, .npz, IDX dir, CIFAR/STL-10 dir, or "
            "'fashion-mnist'. Default: the embedded Fashion-MNIST test split."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory.")] = None,
    preset: Annotated[
        Preset,
        typer.Option(
            help="Recipe: cpu (SimCLR + refinement, minutes on 2 cores), paper (the released MIX'EM "
            "recipe), auto (paper on a GPU, cpu otherwise)."
        ),
    ] = Preset.auto,
    config: Annotated[
        Path | None, typer.Option(help='JSON file {"model": {...}, "train": {...}} of field overrides.')
    ] = None,
    method: Annotated[
        Method | None, typer.Option(help="Objective (default: the preset's: simclr on cpu, mixem on paper).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the data.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", help="Images per step.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    temperature: Annotated[float | None, typer.Option(help="NT-Xent temperature.")] = None,
    backbone: Annotated[str | None, typer.Option(help="convnet | resnet18 | resnet34 | resnet50")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Input side in pixels.")] = None,
    channels: Annotated[int | None, typer.Option("--channels", help="1 (grayscale) or 3 (RGB).")] = None,
    components: Annotated[int | None, typer.Option("--components", "-k", help="K mixture components.")] = None,
    split: Annotated[str | None, typer.Option(help="train | test | all | auto (for standard datasets).")] = None,
    max_images: Annotated[int | None, typer.Option("--max-images", help="Use only the first N images.")] = None,
    impl: Annotated[Impl | None, typer.Option(help="Loss kernels: auto (Triton on CUDA) | triton | torch.")] = None,
    compile: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    eval_every: Annotated[
        int | None, typer.Option("--eval-every", help="Evaluate every N epochs (0: at the end only).")
    ] = None,
    refine: Annotated[
        bool | None,
        typer.Option(
            "--refine/--no-refine",
            help="After the representation, train the head's classes: neighbour consistency, then self-labelling.",
        ),
    ] = None,
    refine_epochs: Annotated[int | None, typer.Option("--refine-epochs", help="Neighbour-stage epochs.")] = None,
    selflabel_epochs: Annotated[int | None, typer.Option("--selflabel-epochs", help="Self-label epochs.")] = None,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Cluster and score the data after training.")
    ] = True,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    device: Device = None,
    seed: Seed = None,
    quiet: Quiet = False,
    json_log: JsonLog = None,
):
    """Train the preset's method (or --method's), refine its classes, and print how well they match any labels."""
    from mixem.api import train as run_train

    run_train(data, out, preset=preset.value, config=config, resume=resume, evaluate=evaluate, quiet=quiet,
              json_log=json_log, backbone=backbone, image_size=image_size, in_channels=channels, components=components,
              method=method.value if method else None, epochs=epochs, batch_size=batch_size, lr=lr,
              temperature=temperature, split=split, max_images=max_images, impl=impl.value if impl else None,
              compile=compile, eval_every=eval_every, refine=refine, refine_epochs=refine_epochs,
              selflabel_epochs=selflabel_epochs, device=device, seed=seed)  # fmt: skip


@app.command("eval")
@_errors
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")],
    data: Annotated[str | None, typer.Argument(help="Data to cluster (default: the data the run trained on).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Clusters (default: number of classes, else K).")] = None,
    split: Annotated[str | None, typer.Option(help="train | test | all | auto")] = None,
    max_images: Annotated[int | None, typer.Option("--max-images")] = None,
    device: Device = None,
    seed: Annotated[int, typer.Option(help="Seed for k-means.")] = 0,
    features: Annotated[str, typer.Option(help="Comma list of backbone, embedding, top_component.")] = ",".join(
        EVAL_FEATURES
    ),
    init: Annotated[str, typer.Option(help="Comma list of k-means starts: mixture, kmeans++, random.")] = ",".join(
        EVAL_INITS
    ),
    normalize: Annotated[bool, typer.Option("--normalize/--raw", help="L2-normalise features before k-means.")] = True,
    quiet: Quiet = False,
    json_log: JsonLog = None,
):
    """Cluster a dataset with a trained model; print ACC/NMI/ARI next to raw-pixel k-means."""
    from mixem.session import eval_command

    eval_command(
        checkpoint,
        data,
        k=k,
        split=split,
        max_images=max_images,
        device=device,
        seed=seed,
        quiet=quiet,
        json_log=json_log,
        feature_types=_choices(features, "--features", FEATURE_TYPES),
        inits=_choices(init, "--init", KMEANS_INITS),
        normalize=normalize,
    )


def _choices(text: str, option: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    picked = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in picked if t not in allowed]
    if bad or not picked:
        raise MixEMError(f"{option} {text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return picked


@app.command()
@_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Run directory or checkpoint directory.")],
    format: Annotated[
        ExportFormat, typer.Option("--format", "-f", help="onnx, or trt (TensorRT engine via ONNX).")
    ] = ExportFormat.onnx,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("export"),
    fp16: Annotated[bool, typer.Option("--fp16", help="Half-precision model.")] = False,
    features: Annotated[bool, typer.Option("--features", help="Also output backbone features.")] = False,
    min_batch: Annotated[
        int | None, typer.Option("--min-batch", help=f"TensorRT profile: smallest batch (default {TRT_PROFILE[0]}).")
    ] = None,
    opt_batch: Annotated[
        int | None, typer.Option("--opt-batch", help=f"TensorRT profile: batch tuned for (default {TRT_PROFILE[1]}).")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option("--max-batch", help=f"TensorRT profile: largest batch (default {TRT_PROFILE[2]}).")
    ] = None,
):
    """Export a checkpoint to ONNX (parity-checked against PyTorch) or a TensorRT engine."""
    from mixem.export import export_checkpoint

    profile = {
        k: v for k, v in dict(min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch).items() if v is not None
    }
    summary = export_checkpoint(checkpoint, fmt=format.value, out_dir=out, fp16=fp16, features=features, **profile)
    typer.echo(json.dumps(summary, indent=2, default=str))


@app.command()
@_errors
def bench(
    name: Annotated[str | None, typer.Argument(help="Benchmark to run; omit to list them.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Tiny CPU-sized cases (smoke test only).")] = False,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Results directory (default bench/results).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present) | cpu | cuda | cuda:N")] = "auto",
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="KEY=VALUE, repeatable: run only the cases with this field value (e.g. M=4096; M=4096,65536 takes either), or set a "
            "study's parameter (e.g. seeds=0,1,2).",
        ),
    ] = None,
):
    """Run a benchmark against its baseline in the same process (or a study) and write JSON results."""
    from mixem.runtime import PASSIVE_OPENMP_BENCHES, passive_openmp

    if name in PASSIVE_OPENMP_BENCHES:
        passive_openmp()  # as the commands they time run (before mixem.bench imports torch)
    import mixem.bench as b

    names = b.available()
    if name is None:
        typer.echo("\n".join(names))
        return
    if name not in names:
        raise MixEMError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    bad = [s for s in settings or () if "=" not in s]
    if bad:
        raise MixEMError(f"--set takes KEY=VALUE, got {bad[0]!r}")
    chosen = dict(s.split("=", 1) for s in settings or ())
    result = b.run(name, quick=quick, out_dir=str(out) if out else None, device=device, settings=chosen)
    for line in b.summary_lines(result):
        typer.echo(line)
    typer.echo(f"wrote {result['path']}")


from mixem.cli import pipeline  # noqa: E402, F401 (registers embed, classify, cluster and search after train ...)


def main():
    app()


if __name__ == "__main__":
    main()
