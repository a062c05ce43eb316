"""ONNX export of a checkpoint: uint8 NCHW in, dynamic batch, fp32 or fp16, checked and parity-gated.

The exported graph (one directory per export):
    model.onnx    input  `images`        uint8   (batch, C, S, S), S = the model's image size, no resize
                  output `embedding`     float32 (batch, D)  L2-normalised mixture embedding
                  output `mixture_probs` float32 (batch, K)  softmax of the gate, pi
                  output `features`      float32 (batch, F)  backbone features (only with features=True)
                  normalisation ((x - mean) / std, the config's) is inside the graph.
    parity.json   agreement with PyTorch on real images (see export/parity.py), with its thresholds
    export.json   what was exported: precision, opset, shapes, versions, the parity verdict
    config.json   the MixEMConfig the model was built from
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mixem import owner
from mixem.engines.onnx_engine import INPUT, MODEL, ONNX_INSTALL, OUTPUTS
from mixem.errors import MixEMError, require
from mixem.export import parity
from mixem.files import save_json
from mixem.outputs import OutputSet, record_path

# Opset 18: the torch.export-based exporter's native opset (no version conversion pass), read by
# onnxruntime >= 1.14 and by TensorRT 10/11's ONNX parser.
OPSET = 18
PARITY, EXPORT, CONFIG = "parity.json", "export.json", "config.json"
PARITY_FAILED = "parity_failed.json"  # the report of a refused export, kept beside the previous set
PARITY_IMAGES = 256
EXPORT_SET = "export"  # model.onnx, parity.json, config.json, export.json: one set (mixem.outputs), export.set.json
# An export folder's files; with TensorRT's (model.plan, model.plan.json, timing.cache), the temporaries of all
# of which a killed export leaves are removed by the next one.
EXPORT_FILES = (MODEL, PARITY, EXPORT, CONFIG, PARITY_FAILED, record_path(".", EXPORT_SET).name)
EXPORT_FILES += ("classes.json", "class_centroids.npy")  # the checkpoint's classes, when it has them
TRT_FILES = ("model.plan", "model.plan.json", "timing.cache")


def claim_export(out_dir: str | os.PathLike):
    """Own an export folder (owner.claim): new, empty, or an export; a failed first export leaves nothing."""
    return owner.claim(
        out_dir,
        "export",
        command="export",
        legacy=(EXPORT, MODEL),
        keep=(record_path(".", EXPORT_SET).name, PARITY_FAILED),
    )


def export_graph(model: torch.nn.Module, *, features: bool = False, opset: int = OPSET):
    """The fp32 ONNX ModelProto of InferenceModel(model) with a dynamic batch axis named `batch`.

    dynamo=True (torch.export): TorchScript export is deprecated, and `dynamic_shapes` states the
    batch axis on the input; the outputs' batch axes follow from the graph.
    """
    require("onnxscript", "ONNX export", ONNX_INSTALL)
    from torch.export import Dim

    from mixem.model import InferenceModel

    cfg = model.cfg
    wrapper = InferenceModel(model.float().cpu().eval(), features=features).eval()
    # Batch 2 for tracing: torch.export specialises sizes 0 and 1, which would pin the axis.
    example = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    names = list(OUTPUTS[: 3 if features else 2])
    try:
        program = torch.onnx.export(
            wrapper,
            (example,),
            None,
            input_names=[INPUT],
            output_names=names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: Dim("batch", min=1)},),
            verbose=False,
        )
    except Exception as e:  # the exporter raises many types; the user needs the first line
        raise MixEMError(f"ONNX export failed for backbone {cfg.backbone!r}: {str(e).splitlines()[0][:300]}") from None
    return program.model_proto


def to_fp16(proto):
    """fp16 weights and compute, uint8 input and fp32 outputs kept (keep_io_types).

    onnxruntime's converter rewrites the already-verified fp32 graph, so the fp16 model is the fp32
    one with casts, not a second trace; exporting a .half() model instead would need PyTorch's CPU
    fp16 kernels at trace time. TensorRT 11 builds fp16 engines from exactly this kind of graph.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)


def onnx_reference(model: torch.nn.Module, features: bool = False):
    """PyTorch fp32 CPU reference with the exported graph's signature (uint8 ndarray in)."""
    from mixem.model import InferenceModel

    ref = InferenceModel(model.float().cpu().eval(), features=features).eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return ref(torch.from_numpy(np.ascontiguousarray(x)))

    return run


def ort_runner(path: str | os.PathLike, threads: int | None = None):
    """onnxruntime CPU session over a file: uint8 ndarray -> list of outputs."""
    ort = require("onnxruntime", "ONNX parity check", ONNX_INSTALL)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3  # errors only: fp16 graphs log a cast-insertion warning per node on CPU
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {INPUT: np.ascontiguousarray(x)})


def export_onnx(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = False,
    features: bool = False,
    opset: int = OPSET,
    parity_images: int = PARITY_IMAGES,
    min_cosine: float | None = None,
    max_prob_error: float | None = None,
) -> dict:
    """Export the checkpoint at `ckpt` to out_dir/model.onnx; returns the summary written to export.json.

    The model is staged under a temporary name, checked (onnx.checker full_check), run through
    onnxruntime against PyTorch on real images, and committed with its reports as one set (export.set.json,
    mixem.outputs) only if parity holds; otherwise a one-line MixEMError is raised, the previous set stays
    whole, and the failed report is left in parity_failed.json. The folder is owned while this runs.
    """
    from mixem.checkpoint import load_model

    require("onnx", "ONNX export", ONNX_INSTALL)
    model, cfg = load_model(ckpt, "cpu")  # before the folder is touched: a bad checkpoint changes nothing
    out = Path(out_dir)
    with claim_export(out), OutputSet(out, EXPORT_SET) as outs:
        owner.clean_temps(out, EXPORT_FILES + TRT_FILES)
        return _export_into(outs, ckpt, model, cfg, fp16, features, opset, parity_images, min_cosine, max_prob_error)


def _export_into(outs: OutputSet, ckpt, model, cfg, fp16, features, opset, parity_images, min_cosine, max_prob_error):
    """Stage model.onnx (checked, parity-gated), parity.json, config.json and export.json in outs; the summary."""
    import onnx

    from mixem.checkpoint import resolve

    t0 = time.perf_counter()
    out = outs.out
    proto = export_graph(model, features=features, opset=opset)
    precision = "fp16" if fp16 else "fp32"
    if fp16:
        proto = to_fp16(proto)
    final = out / MODEL
    tmp = outs.write(MODEL, lambda p: onnx.save_model(proto, str(p)))  # one file: far below protobuf's 2 GB
    try:
        onnx.checker.check_model(str(tmp), full_check=True)
    except onnx.checker.ValidationError as e:
        raise MixEMError(f"{final}: exported graph fails onnx.checker: {str(e).splitlines()[0][:300]}") from None
    images = parity.real_images(parity_images, cfg.image_size, cfg.in_channels)
    report = parity.compare(onnx_reference(model, features), ort_runner(tmp), images)
    report = parity.gate(report, precision, min_cosine, max_prob_error)
    report["runtime"] = "onnxruntime CPUExecutionProvider vs PyTorch fp32 CPU"
    if not report["passed"]:
        save_json(report, out / PARITY_FAILED)
        raise MixEMError(
            f"{final}: " + parity.failure_line(report, "ONNX " + precision) + f"; report in {out / PARITY_FAILED}"
        )
    (out / PARITY_FAILED).unlink(missing_ok=True)
    outs.write(PARITY, lambda p: p.write_text(_json(report)))
    outs.write(CONFIG, lambda p: p.write_text(_json(dataclasses.asdict(cfg))))
    _copy_classes(outs, ckpt)
    summary = describe(tmp, cfg, precision=precision, opset=opset, features=features)
    summary.update(
        path=str(final),
        format="onnx",
        checkpoint=str(resolve(ckpt)),
        parity=_short(report),
        seconds=round(time.perf_counter() - t0, 2),
    )
    outs.write(EXPORT, lambda p: p.write_text(json.dumps(summary, indent=2) + "\n"))
    return summary


def _copy_classes(outs: OutputSet, ckpt) -> None:
    """The checkpoint's classes (mixem.classes) travel with the model: `mixem.load(export dir).predict` and
    `classify` with this model give the classes the run was scored by."""
    import shutil

    from mixem.classes import CLASS_CENTROIDS, CLASSES, read

    found = read(ckpt)  # checked: classes of other weights are refused, not copied
    where = Path(found.where).parent if found is not None else None
    for name in (CLASSES, CLASS_CENTROIDS) if where is not None else ():
        if (where / name).is_file():
            outs.write(name, lambda p, src=where / name: shutil.copyfile(src, p))


def _json(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def describe(path: Path, cfg, *, precision: str, opset: int, features: bool) -> dict:
    """What a consumer needs to know about model.onnx, read back from the written graph."""
    import onnx
    import onnxruntime

    proto = onnx.load(str(path))
    return {
        "path": str(path),
        "precision": precision,
        "opset": opset,
        "features": features,
        "size_bytes": path.stat().st_size,
        **io_spec(proto),
        "image_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }


def io_spec(proto) -> dict:
    """{"inputs": {name: {dtype, shape}}, "outputs": {...}}; a dynamic axis appears by its name."""
    import onnx

    def one(v):
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return {
        "inputs": {v.name: one(v) for v in proto.graph.input},
        "outputs": {v.name: one(v) for v in proto.graph.output},
    }


def _short(report: dict) -> dict:
    keys = ("images", "min_cosine", "max_prob_error", "argmax_agreement", "passed")
    return {k: report[k] for k in keys}
