"""FP16 and INT8 (explicit Q/DQ) ONNX graphs for TensorRT's strongly typed builder, and the
precision report that every build writes beside its models.

TensorRT 11 takes precision from the graph, not from builder flags:
- FP16: the FP32 graph with FP16 weights and compute (its pixel prologue too), the uint8 `INPUT`
  and FP32 outputs kept;
- INT8: symmetric INT8 Q/DQ, weights per output channel (axis 0), activations per tensor,
  calibrated on images. Only the dense convolutions and the head's Gemm are quantized: the depthwise
  LiteConvs and the gates become FP16 plugins (see `plugin_rewrite.fp16_plugins_in_fp32_graph`).
Both are made from the plugin-free graph; the plugin rewrite comes after.

The report executes the plugin-free FP16 and INT8 graphs with ONNX Runtime on the CPU (real FP16
and INT8 arithmetic, not a simulation) and compares their embeddings with FP32.
"""
from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from osnet_base.errors import OsnetTritonError
from osnet_base.contract import EMBEDDING_NAME, INPUT_NAME

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Without --calib-method. The CPU INT8 graph is calibrated at every `--runtime auto` build, and on the
# reference model MinMax is as close to FP32 there as percentile at 2.5x the speed; the TensorRT
# graph's floors and the README's precision report were measured with percentile.
CPU_CALIBRATION_METHOD = "minmax"
TENSORRT_CALIBRATION_METHOD = "percentile"


class PrecisionFloorError(OsnetTritonError):
    """A reduced-precision graph whose embeddings drift from FP32 beyond the agreed floor."""


def make_fp16_onnx(fp32_model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 weights and activations inside; the graph's uint8 input and FP32 outputs as they were."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(fp32_model, keep_io_types=True, disable_shape_infer=False)


class _ImageBatches:
    """ONNX Runtime's CalibrationDataReader protocol over input pixels (uint8 [N,256,128,3])."""

    def __init__(self, images: np.ndarray, batch_size: int):
        self._batches: Iterator[np.ndarray] = (images[i : i + batch_size] for i in range(0, len(images), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    fp32_model: onnx.ModelProto,
    calibration_images: np.ndarray,
    *,
    method: str,
    leave_in_float: Collection[str] = (),
    float_weights: bool = False,
    batch_size: int = 8,
) -> onnx.ModelProto:
    """The one INT8 quantizer: symmetric Q/DQ of every Conv and Gemm but the nodes named in
    `leave_in_float`, weights per output channel, activations per tensor, calibrated on images.

    The TensorRT graph leaves the plugin-bound nodes in float and keeps float weights behind a Q/DQ
    pair (`float_weights`), which TensorRT's parser folds; the CPU graph quantizes everything and
    stores INT8 weights, which ONNX Runtime and OpenVINO run directly.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if len(calibration_images) == 0:
        raise ValueError("INT8 calibration needs at least one image")
    # ERROR: quantize_static warns on every call to "pre-process" the model first (fold BatchNorm,
    # infer shapes), and logs each bias initializer it copies at INFO; the export folded every BatchNorm.
    with tempfile.TemporaryDirectory() as scratch, _root_logging_at_least(logging.ERROR):
        source, target = Path(scratch) / "fp32.onnx", Path(scratch) / "int8.onnx"
        onnx.save(fp32_model, source)
        ranges = None
        if method == "entropy":
            ranges = Path(scratch) / "ranges.json"
            _calibrate_entropy(source, calibration_images, batch_size, ranges)
        quantize_static(
            str(source),
            str(target),
            None if ranges else _ImageBatches(calibration_images, batch_size),
            calibration_cache_path=ranges,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv", "Gemm"],
            nodes_to_exclude=sorted(leave_in_float),
            calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                              "entropy": CalibrationMethod.Entropy}[method],
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "AddQDQPairToWeight": float_weights,
            },
        )
        return onnx.load(target)


# quantize_static's entropy calibration bins activations into 128 bins and quantizes them to 128:
# then the best threshold is always the maximum and `entropy` returns minmax's ranges, scale for
# scale (measured, ONNX Runtime 1.32). TensorRT's entropy calibrator bins into 2048; the search costs
# the square of the bins in Python (osnet_x0_25: 100 s at 2048 on 2 cores), so 512: thresholds down
# to a quarter of the maximum, ~16x cheaper.
ENTROPY_HISTOGRAM = {"num_bins": 512, "num_quantized_bins": 128}


def _calibrate_entropy(model_path: Path, images: np.ndarray, batch_size: int, ranges_path: Path) -> None:
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator, save_tensors_data

    calibrator = create_calibrator(model_path, ["Conv", "Gemm"], augmented_model_path=str(ranges_path.with_name("augmented.onnx")),
                                   calibrate_method=CalibrationMethod.Entropy, extra_options=ENTROPY_HISTOGRAM)
    calibrator.collect_data(_ImageBatches(images, batch_size))
    save_tensors_data(calibrator.compute_data(), ranges_path)


@contextlib.contextmanager
def _root_logging_at_least(level: int) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    root.setLevel(max(level, previous))
    try:
        yield
    finally:
        root.setLevel(previous)


@dataclass(frozen=True)
class PrecisionFloor:
    """The agreement with FP32 a build must reach; defaults from measurements on the reference model."""

    min_mean_cosine: float
    min_cosine: float
    min_top1_agreement: float


DEFAULT_FLOORS = {
    "fp16": PrecisionFloor(min_mean_cosine=0.999, min_cosine=0.995, min_top1_agreement=0.95),
    "int8": PrecisionFloor(min_mean_cosine=0.98, min_cosine=0.9, min_top1_agreement=0.8),
}


@dataclass(frozen=True)
class PrecisionResult:
    precision: str
    images: int
    mean_cosine: float
    min_cosine: float
    top1_agreement: float
    top5_agreement: float
    floor: PrecisionFloor
    passed: bool


def retrieval_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Mean overlap of each image's k nearest neighbours (itself excluded) under the two embeddings."""
    def neighbours(embeddings: np.ndarray) -> np.ndarray:
        similarity = embeddings @ embeddings.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argsort(-similarity, axis=1, kind="stable")[:, :k]

    ours, theirs = neighbours(reference), neighbours(candidate)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ours, theirs)]))


def compare_with_fp32(
    precision: str, fp32_embeddings: np.ndarray, embeddings: np.ndarray, floor: PrecisionFloor
) -> PrecisionResult:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    reference = fp32_embeddings / np.linalg.norm(fp32_embeddings, axis=1, keepdims=True)
    cosines = np.sum(unit * reference, axis=1)
    top1 = retrieval_agreement(reference, unit, 1)
    result = PrecisionResult(
        precision=precision,
        images=len(embeddings),
        mean_cosine=float(cosines.mean()),
        min_cosine=float(cosines.min()),
        top1_agreement=top1,
        top5_agreement=retrieval_agreement(reference, unit, min(5, len(unit) - 1)),
        floor=floor,
        passed=bool(
            cosines.mean() >= floor.min_mean_cosine and cosines.min() >= floor.min_cosine and top1 >= floor.min_top1_agreement
        ),
    )
    return result


def embed_with_onnxruntime(model: onnx.ModelProto, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate(
        [session.run([EMBEDDING_NAME], {INPUT_NAME: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    ).astype(np.float32)


def write_precision_report(results: list[PrecisionResult], directory: Path, variant: str, weights: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = directory / "precision_report.json", directory / "precision_report.md"
    json_path.write_text(json.dumps({"variant": variant, "weights": weights, "results": [asdict(r) for r in results]}, indent=2))
    lines = [
        f"# Precision report: {variant}",
        "",
        f"Weights: {weights}. Embeddings of held-out images from ONNX Runtime (CPU) executing each",
        "plugin-free graph, compared with FP32. Top-k agreement: overlap of each image's k nearest",
        "neighbours under FP32 and under the reduced precision.",
        "",
        "| precision | images | mean cosine | min cosine | top-1 agreement | top-5 agreement | floor (mean / min / top-1) | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in results:
        floor = f"{r.floor.min_mean_cosine} / {r.floor.min_cosine} / {r.floor.min_top1_agreement}"
        lines.append(
            f"| {r.precision} | {r.images} | {r.mean_cosine:.6f} | {r.min_cosine:.6f} | {r.top1_agreement:.3f} | "
            f"{r.top5_agreement:.3f} | {floor} | {'pass' if r.passed else 'FAIL'} |"
        )
    markdown_path.write_text("\n".join(lines) + "\n")
    return json_path, markdown_path


def enforce_floors(results: list[PrecisionResult]) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        details = "; ".join(
            f"{r.precision}: mean cosine {r.mean_cosine:.5f} (floor {r.floor.min_mean_cosine}), min {r.min_cosine:.5f} "
            f"(floor {r.floor.min_cosine}), top-1 agreement {r.top1_agreement:.3f} (floor {r.floor.min_top1_agreement})"
            for r in failed
        )
        raise PrecisionFloorError(
            f"reduced precision drifts too far from FP32: {details}. Calibrate on images like the ones you serve "
            "(--calib-dir), try another --calib-method, or lower the floor knowingly (--min-mean-cosine ...)."
        )
