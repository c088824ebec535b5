"""Deployment to LiteRT/TFLite int8: export in one call, the agreement report, the scales explained.

* :func:`export_tflite` converts a graphquant-quantized Keras model through
  ``tf.lite.TFLiteConverter`` into a fully integer ``.tflite`` file. The
  activation ranges graphquant learned or calibrated reach the converter as
  TensorFlow ``FakeQuant`` ops with constant ranges (the model is traced with
  XLA off and its variables frozen), so the converter does not re-calibrate
  them. Only tensors without a graphquant range (the model input when the
  model does not round it, the outputs of ops graphquant does not round) get
  their range from the converter's own calibration over
  ``representative_data`` (default: ``check_data``); the report lists how
  many such tensors there were.
* With ``check_data`` the LiteRT interpreter (``ai-edge-litert``) runs the
  file with its reference kernels and with its default kernels (XNNPACK
  delegate) and the report compares both with the simulation, per output, in
  LSBs of the output's scale. A ``tflite_int8`` model is simulated with the
  matching integer kernels for each (:data:`SIMULATED_KERNELS`: reference ->
  ``"reference"``, default -> ``"xnnpack"``; see
  :func:`graphquant.keras.integer.link_integer`).
* :func:`tflite_scales` lists, per convolution / depthwise / fully connected
  op, the scales and zero points and the output multiplier
  ``M = s_in * s_w / s_out`` as TFLite's ``QuantizeMultiplier`` stores it (an
  int32 mantissa and a shift).
* :func:`compare_tflite` compares every intermediate tensor of the
  interpreter with the simulation's value at the same rounding point.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._table import render_table
from ._version import __version__
from .types import ModelLike, PathLike

__all__ = [
    "TFLiteReport",
    "TFLiteScales",
    "OpScales",
    "export_tflite",
    "tflite_scales",
    "compare_tflite",
    "quantize_multiplier",
    "multiply_by_quantized_multiplier",
    "load_interpreter",
]

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import tensorflow as tf

#: what the interpreter runs: an array (a model with one input) or a list of arrays, one per model input; unlike
#: :data:`graphquant.types.DataLike`, not a dict or a dataset (the interpreter's inputs are positional)
ArrayInputs = Union[np.ndarray, Sequence[np.ndarray]]
#: ``inference_input_type`` / ``inference_output_type``: ``"int8"``, ``"uint8"``, ``"float32"`` or the dtype
TypeLike = Union[str, "tf.DType", type]
_MANIFEST_SUFFIX = ".graphquant.json"
_MANIFEST_KIND = "graphquant-tflite"
KERNELS = ("reference", "default")
_INT_TYPES = {"int8": "int8", "float32": "float32", "float": "float32", "uint8": "uint8"}


# --------------------------------------------------------------------------- the interpreter
def _litert():
    try:
        from ai_edge_litert import interpreter as litert  # type: ignore
    except ImportError:
        raise ImportError(
            "graphquant's TFLite support needs the LiteRT interpreter: pip install graphquant[tflite]"
        ) from None
    return litert


def load_interpreter(model: Union[PathLike, bytes], kernels: str = "reference", preserve_all_tensors: bool = False):
    """A LiteRT ``Interpreter`` for a ``.tflite`` file or its bytes.

    ``kernels="reference"``: TFLite's reference kernels (``BUILTIN_REF``, the
    ones :func:`graphquant.quantize_model` with ``target="tflite_int8"``
    reproduces by default); ``"default"``: the default resolver, which runs
    int8 ops through the XNNPACK delegate where it can (reproduced with
    ``kernels="xnnpack"``).
    """
    litert = _litert()
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    kw: Dict[str, Any] = {}
    if isinstance(model, (bytes, bytearray)):
        kw["model_content"] = bytes(model)
    else:
        kw["model_path"] = os.fspath(model)
    if kernels == "reference":
        kw["experimental_op_resolver_type"] = litert.OpResolverType.BUILTIN_REF
    if preserve_all_tensors:
        kw["experimental_preserve_all_tensors"] = True
    return litert.Interpreter(**kw)


def _as_inputs(data: Any, n_inputs: int) -> List[np.ndarray]:
    if isinstance(data, dict):
        raise TypeError("check_data: give an array (or a list of arrays, one per model input), not a dict")
    if isinstance(data, np.ndarray):
        data = [data]
    data = [np.asarray(d) for d in data]
    if len(data) != n_inputs:
        raise ValueError(f"check_data: the model has {n_inputs} inputs, got {len(data)} arrays")
    if not data[0].shape or data[0].shape[0] == 0:
        raise ValueError("check_data: needs at least one example (a leading batch axis)")
    return data


def _quantize_input(x: np.ndarray, detail: Dict[str, Any]) -> np.ndarray:
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return x.astype(dtype)
    from .keras.integer import quantize_input_tf

    scale, zp = detail["quantization"]
    info = np.iinfo(dtype)
    # TFLite's QUANTIZE (what the simulation's input rounding point computes, too)
    q = quantize_input_tf(x, scale, zp, float(info.min), float(info.max)).numpy() + zp
    return q.astype(dtype)


def run_interpreter(interp: Any, inputs: Sequence[np.ndarray], batch: int = 64) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Run ``interp`` on ``inputs`` (float arrays); returns ``(raw outputs, dequantized outputs)``."""
    in_d = interp.get_input_details()
    out_d = interp.get_output_details()
    n = inputs[0].shape[0]
    raws: List[List[np.ndarray]] = [[] for _ in out_d]
    shape = None
    for start in range(0, n, batch):
        chunk = [x[start:start + batch] for x in inputs]
        if shape != chunk[0].shape[0]:
            for d, x in zip(in_d, chunk):
                interp.resize_tensor_input(d["index"], x.shape)
            interp.allocate_tensors()
            shape = chunk[0].shape[0]
        for d, x in zip(in_d, chunk):
            interp.set_tensor(d["index"], _quantize_input(x, d))
        interp.invoke()
        for k, d in enumerate(out_d):
            raws[k].append(interp.get_tensor(d["index"]).copy())
    raw = [np.concatenate(r) for r in raws]
    deq = []
    for r, d in zip(raw, out_d):
        if np.issubdtype(r.dtype, np.floating):
            deq.append(r.astype(np.float32))
        else:
            s, z = d["quantization"]
            deq.append(((r.astype(np.float32) - z) * np.float32(s)).astype(np.float32))
    return raw, deq


# --------------------------------------------------------------------------- model structure
def _ops(interp: Any) -> List[Dict[str, Any]]:
    return list(interp._get_ops_details())


def _tensors(interp: Any) -> Dict[int, Dict[str, Any]]:
    return {d["index"]: d for d in interp.get_tensor_details()}


def _qparams(d: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    qp = d.get("quantization_parameters") or {}
    return np.asarray(qp.get("scales", []), np.float64), np.asarray(qp.get("zero_points", []), np.int64)


def _output_scales(interp: Any) -> List[Tuple[float, int]]:
    """Scale and zero point of each model output (for a float output: of the int8 tensor its DEQUANTIZE reads)."""
    tensors = _tensors(interp)
    producer = {}
    for op in _ops(interp):
        for o in op["outputs"]:
            producer[o] = op
    out = []
    for d in interp.get_output_details():
        s, z = d["quantization"]
        if s == 0.0:
            op = producer.get(d["index"])
            if op is not None and op["op_name"] == "DEQUANTIZE":
                s, z = tensors[op["inputs"][0]]["quantization"]
        out.append((float(s), int(z)))
    return out


def _op_summary(interp: Any) -> Tuple[Dict[str, int], List[str]]:
    """Op counts, and the ops that compute in float (not counting the QUANTIZE/DEQUANTIZE at the edges)."""
    tensors = _tensors(interp)
    counts: Dict[str, int] = {}
    float_ops: List[str] = []
    for op in _ops(interp):
        name = op["op_name"]
        counts[name] = counts.get(name, 0) + 1
        if name in ("QUANTIZE", "DEQUANTIZE"):
            continue
        ios = [i for i in list(op["inputs"]) + list(op["outputs"]) if i >= 0]
        if any(np.issubdtype(tensors[i]["dtype"], np.floating) for i in ios):
            float_ops.append(f"{name}#{op['index']}")
    return counts, float_ops


# --------------------------------------------------------------------------- the multiplier
def quantize_multiplier(m: float) -> Tuple[int, int]:
    """TFLite's ``QuantizeMultiplier``: ``m ~= mantissa * 2**(shift - 31)``, ``mantissa`` an int32 in
    ``[2**30, 2**31)`` (0 for ``m == 0``); ``shift > 0`` is a left shift."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(float(m))  # m = q * 2**shift, q in [0.5, 1)
    q_fixed = math.floor(q * (1 << 31) + 0.5)  # std::round: half away from zero (q > 0; Python's round: to even)
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return q_fixed, shift


def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp's SaturatingRoundingDoublingHighMul on int64 arrays holding int32 values."""
    ab = a.astype(np.int64) * b.astype(np.int64)
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    t = ab + nudge
    res = np.where(t >= 0, t >> 31, -((-t) >> 31))  # C++ integer division truncates toward zero
    overflow = (a == b) & (a == -(1 << 31))
    return np.where(overflow, (1 << 31) - 1, res)


def _rdbypot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp's RoundingDivideByPOT: round half away from zero."""
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(acc: Any, mantissa: Any, shift: Any) -> np.ndarray:
    """TFLite's reference ``MultiplyByQuantizedMultiplier`` (numpy, int64 arrays of int32 values)."""
    acc = np.asarray(acc, np.int64)
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    return _rdbypot(_srdhm(acc * (np.int64(1) << left), np.asarray(mantissa, np.int64)), right)


@dataclass
class OpScales:
    """Scales of one conv / depthwise / fully connected op of a ``.tflite`` file."""

    op: str
    index: int
    output: str
    input_scale: float
    input_zero_point: int
    weight_scales: List[float]
    weight_zero_points: List[int]
    bias_scales: List[float]
    output_scale: float
    output_zero_point: int
    multipliers: List[float]
    mantissas: List[int]
    shifts: List[int]
    weight_levels: int  # most distinct int8 values in one output channel

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _range_str(v: Sequence[float], fmt: str = "{:.4g}") -> str:
    if len(v) == 0:
        return "-"
    lo, hi = min(v), max(v)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}..{fmt.format(hi)}"


@dataclass
class TFLiteScales:
    """Per-op scales of a ``.tflite`` file; ``print()`` gives a table, :meth:`to_dict` the data."""

    path: str
    ops: List[OpScales] = field(default_factory=list)

    def table(self) -> str:
        body = []
        for o in self.ops:
            body.append([
                f"{o.op}#{o.index}", o.output[:40], f"{o.input_scale:.6g}", str(o.input_zero_point),
                _range_str(o.weight_scales), _range_str(o.bias_scales), f"{o.output_scale:.6g}",
                str(o.output_zero_point), _range_str(o.multipliers), _range_str(o.mantissas, "{}"),
                _range_str(o.shifts, "{}"), str(len(o.weight_scales)),
            ])  # fmt: skip
        head = ["op", "output", "s_in", "zp_in", "s_w", "s_bias", "s_out", "zp_out", "M", "mantissa", "shift",
                "channels"]  # fmt: skip
        lines = [f"TFLite scales of {self.path}: M = s_in*s_w/s_out = mantissa * 2**(shift-31)"]
        lines += render_table(head, body, right={2, 3, 4, 5, 6, 7, 8, 9, 10, 11})
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "ops": [o.to_dict() for o in self.ops]}


_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")


def tflite_scales(path: Union[PathLike, bytes]) -> TFLiteScales:
    """The scales of every conv / depthwise / transpose-conv / fully connected op of a ``.tflite`` model.

    Per op: the input scale and zero point, the per-channel weight scales
    (symmetric: zero points 0), the bias scales (``s_in * s_w[c]``), the
    output scale and zero point, and the output multiplier
    ``M[c] = s_in * s_w[c] / s_out`` with TFLite's int32 mantissa and shift
    (:func:`quantize_multiplier`): the kernel computes
    ``out = zp_out + MultiplyByQuantizedMultiplier(acc, mantissa, shift)``
    with ``acc = sum (q_in - zp_in) * q_w + q_bias`` in int32.
    """
    interp = load_interpreter(path)
    tensors = _tensors(interp)
    out = TFLiteScales(path="<bytes>" if isinstance(path, (bytes, bytearray)) else os.fspath(path))
    for op in _ops(interp):
        name = op["op_name"]
        if name not in _WEIGHT_OPS:
            continue
        ins = list(op["inputs"])
        if name == "TRANSPOSE_CONV":  # (output_shape, weights, input, bias)
            x_i, w_i, b_i = ins[2], ins[1], ins[3] if len(ins) > 3 else -1
        else:
            x_i, w_i, b_i = ins[0], ins[1], ins[2] if len(ins) > 2 else -1
        xd, wd, od = tensors[x_i], tensors[w_i], tensors[op["outputs"][0]]
        if not np.issubdtype(wd["dtype"], np.integer) or not np.issubdtype(od["dtype"], np.integer):
            continue
        s_in, z_in = _qparams(xd)
        s_w, z_w = _qparams(wd)
        s_out, z_out = _qparams(od)
        s_b = _qparams(tensors[b_i])[0] if b_i >= 0 else np.array([])
        s_w_full = np.broadcast_to(s_w, s_w.shape if s_w.size > 1 else (1,))
        # TFLite computes the effective scale in double from the float32 scales
        m = [float(np.float64(np.float32(s_in[0])) * np.float64(np.float32(s)) / np.float64(np.float32(s_out[0])))
             for s in s_w_full]  # fmt: skip
        qm = [quantize_multiplier(v) for v in m]
        levels = 0
        try:
            w = interp.get_tensor(w_i)
            axis = 3 if name == "DEPTHWISE_CONV_2D" else 0
            wq = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            levels = max(len(np.unique(r)) for r in wq)
        except ValueError:
            pass
        out.ops.append(OpScales(
            op=name, index=int(op["index"]), output=str(od["name"]),
            input_scale=float(s_in[0]), input_zero_point=int(z_in[0]),
            weight_scales=[float(v) for v in s_w], weight_zero_points=[int(v) for v in z_w],
            bias_scales=[float(v) for v in s_b], output_scale=float(s_out[0]), output_zero_point=int(z_out[0]),
            multipliers=m, mantissas=[q for q, _ in qm], shifts=[s for _, s in qm], weight_levels=int(levels),
        ))  # fmt: skip
    return out


# --------------------------------------------------------------------------- export
def _frozen_function(model: Any):
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from .rounding import use_xla

    specs = [tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype, name=x.name.split(":")[0])
             for x in model.inputs]  # fmt: skip
    single = len(specs) == 1

    def fn(*xs):
        y = model(xs[0] if single else list(xs), training=False)
        return y

    from .weights import int8_export

    with int8_export(), use_xla(False):  # plain TensorFlow FakeQuant ops, which the converter reads
        concrete = tf.function(fn).get_concrete_function(*specs)
    return convert_variables_to_constants_v2(concrete)


def _fake_quant_count(concrete: Any) -> int:
    n = 0
    for node in concrete.graph.as_graph_def().node:
        if node.op.startswith("FakeQuantWithMinMax"):
            n += 1
    return n


def _tf_dtype(value: Any, what: str):
    import tensorflow as tf

    if value in (None, "float32", "float", tf.float32, np.float32):
        return tf.float32
    if value in ("int8", tf.int8, np.int8):
        return tf.int8
    if value in ("uint8", tf.uint8, np.uint8):
        return tf.uint8
    raise ValueError(f"{what} must be 'int8', 'uint8' or 'float32', got {value!r}")


def _batches(data: Sequence[np.ndarray], batch: int = 16) -> Iterator[List[np.ndarray]]:
    n = data[0].shape[0]
    for start in range(0, n, batch):
        yield [x[start:start + batch].astype(np.float32) for x in data]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + _MANIFEST_SUFFIX)


def _check_destination(path: Path, overwrite: bool) -> None:
    """Refuse to replace anything graphquant did not write (its manifest ``PATH.graphquant.json`` records
    the file's fingerprint)."""
    if path.is_dir():
        raise ValueError(f"path: {path} is a folder; give a .tflite file path")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"path: {path.parent} is not a folder")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ValueError(f"path: {path} exists; pass overwrite=True (CLI: --overwrite) to replace a file graphquant wrote")
    man = _manifest_path(path)
    try:
        data = json.loads(man.read_text())
    except (OSError, ValueError):
        data = None
    if path.is_symlink() or not isinstance(data, dict) or data.get("kind") != _MANIFEST_KIND \
            or data.get("sha256") != _sha256(path):
        raise ValueError(f"path: {path} exists and was not written by graphquant (or was changed since); "
                         "refusing to overwrite it")


def _write_atomic(path: Path, content: bytes, manifest: Dict[str, Any]) -> None:
    from .outputs import TMP_MARK

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    man = dict(manifest, kind=_MANIFEST_KIND, sha256=_sha256(path), graphquant=__version__)
    mp = _manifest_path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{mp.name}{TMP_MARK}{os.getpid()}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(man, f, indent=2)
    os.replace(tmp, mp)


@dataclass
class OutputAgreement:
    """Agreement of one model output between the interpreter and the simulation."""

    name: str
    kernels: str
    scale: float
    zero_point: int
    max_diff_lsb: float
    equal_pct: float
    top1_pct: Optional[float]
    n: int
    simulated: Optional[str] = None  # the simulation's kernel set (None: the model has no integer kernels)

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TFLiteReport:
    """What :func:`export_tflite` wrote and how well the simulation predicts it."""

    path: str
    size: int
    input_type: str
    output_type: str
    fully_integer: bool
    float_ops: List[str]
    ops: Dict[str, int]
    graphquant_ranges: int  # FakeQuant ops (activations and weights) carrying graphquant's ranges
    calibrated_by_converter: bool
    agreement: List[OutputAgreement] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def exact(self, kernels: str = "reference") -> bool:
        """Whether every output element of the simulation equals the interpreter's with ``kernels``."""
        rows = [a for a in self.agreement if a.kernels == kernels]
        return bool(rows) and all(a.max_diff_lsb == 0 for a in rows)

    def max_diff_lsb(self, kernels: str = "reference") -> float:
        rows = [a for a in self.agreement if a.kernels == kernels]
        return max((a.max_diff_lsb for a in rows), default=float("nan"))

    def table(self) -> str:
        ops = ", ".join(f"{k}x{v}" if v > 1 else k for k, v in sorted(self.ops.items()))
        lines = [
            f"TFLite export {self.path} ({self.size} bytes): input {self.input_type}, output {self.output_type}, "
            + ("fully integer" if self.fully_integer else f"NOT fully integer (float ops: {', '.join(self.float_ops)})"),
            f"ops: {ops}",
            f"ranges: {self.graphquant_ranges} from graphquant (FakeQuant)"
            + ("; the rest calibrated by the converter on representative_data" if self.calibrated_by_converter else ""),
        ]
        if self.agreement:
            body = []
            for a in self.agreement:
                top1 = "-" if a.top1_pct is None else f"{a.top1_pct:.2f}"
                body.append([a.name, a.kernels, a.simulated or "-", f"{a.max_diff_lsb:g}", f"{a.equal_pct:.3f}", top1,
                             str(a.n)])  # fmt: skip
            lines.append("agreement with the simulation (diff in LSBs of the output scale; kernels: the "
                         "interpreter's, default = XNNPACK delegate; simulated: the simulation's integer kernels):")
            lines += render_table(["output", "kernels", "simulated", "max |diff| LSB", "% equal", "top-1 %",
                                   "examples"], body, right={3, 4, 5, 6})  # fmt: skip
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> Dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "agreement"}
        d["agreement"] = [a.to_dict() for a in self.agreement]
        return d


#: The simulation's kernel set (:data:`graphquant.keras.integer.KERNELS`) for each interpreter kernel set.
SIMULATED_KERNELS = {"reference": "reference", "default": "xnnpack"}


def agreement(model: Any, tflite: Union[PathLike, bytes], data: ArrayInputs, kernels: Sequence[str] = KERNELS,
              simulated: Optional[str] = None) -> List[OutputAgreement]:
    """Per output and interpreter kernel set: the interpreter's dequantized output against the simulation's.

    The simulation computes the same kernel set's arithmetic (:data:`SIMULATED_KERNELS`) when the model has
    integer kernels (``target="tflite_int8"``), or the kernel set ``simulated`` (``"reference"`` /
    ``"xnnpack"``) for every interpreter kernel set (how far one kernel set is from the other).
    """
    from .keras.integer import check_kernels

    if simulated is not None:
        check_kernels(simulated, "simulated")
    src = model if isinstance(model, _Source) else _Source(model)
    xs = _as_inputs(data, src.n_inputs)
    rows = []
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"kernels must be a subset of {KERNELS}, got {k!r}")
        want = simulated or SIMULATED_KERNELS[k]
        sim, sim_kernels = src.simulate(xs, kernels=want), src.simulated(want)
        interp = load_interpreter(tflite, k)
        interp.allocate_tensors()
        scales = _output_scales(interp)
        names = [d["name"] for d in interp.get_output_details()]
        _, deq = run_interpreter(interp, xs)
        for name, y, s, (scale, zp) in zip(names, deq, sim, scales):
            s = s.reshape(y.shape).astype(np.float32)
            lsb = np.abs(y.astype(np.float64) - s.astype(np.float64)) / scale if scale > 0 else np.abs(y - s)
            lsb = np.round(lsb, 3)
            top1 = None
            if y.ndim == 2 and y.shape[1] > 1:
                top1 = float(np.mean(y.argmax(1) == s.argmax(1)) * 100)
            rows.append(OutputAgreement(
                name=str(name), kernels=k, scale=scale, zero_point=zp, max_diff_lsb=float(lsb.max()),
                equal_pct=float(np.mean(lsb < 0.5) * 100), top1_pct=top1, n=int(y.shape[0]), simulated=sim_kernels,
            ))  # fmt: skip
    return rows


class _Source:
    """A model to export: its frozen inference function and a way to run the simulation."""

    def __init__(self, model: Any, signature: str = "serving_default"):
        import keras

        self.keras_model = None
        if isinstance(model, (str, os.PathLike)):
            p = Path(model)
            if p.is_file() and p.suffix in (".keras", ".h5"):
                from .keras.loading import load_keras_file

                model = load_keras_file(p, "model")
            elif p.is_dir():
                self._load_saved_model(p, signature)
                return
            else:
                raise ValueError(f"model: {p}: expected a .keras file or a SavedModel folder")
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a Keras model, a .keras file or a SavedModel folder, got {type(model).__name__}")
        self.keras_model = model
        self.integer = _link_target_model(model)
        self.name = model.name
        self.n_inputs = len(model.inputs)
        self.concrete = _frozen_function(model)
        self.weight_bits = _weight_bits(model)
        self._runs: Dict[str, Any] = {}
        self._run = self._keras_run(None)

    def _load_saved_model(self, p: Path, signature: str) -> None:
        """A converted SavedModel folder: its ``signature`` frozen, and run with its inputs in name order."""
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        from .rounding import use_xla

        try:
            with use_xla(False):
                loaded = tf.saved_model.load(os.fspath(p))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"model: {p}: cannot load the SavedModel ({msg})") from None
        if signature not in loaded.signatures:
            raise ValueError(f"model: {p} has no signature {signature!r} (has {sorted(loaded.signatures)})")
        sig = loaded.signatures[signature]
        self._loaded = loaded
        self.name = p.name
        self.input_names = sorted(sig.structured_input_signature[1])
        self.n_inputs = len(self.input_names)
        self.concrete = convert_variables_to_constants_v2(sig)
        self.weight_bits = None

        def run(*xs):
            out = sig(**{k: tf.constant(x, tf.float32) for k, x in zip(self.input_names, xs)})
            return [out[k] for k in sorted(out)]

        self._run = run

    def _keras_run(self, kernels: Optional[str]):
        """A function running the Keras model at inference with the integer ``kernels`` (traced with them)."""
        import tensorflow as tf

        from .keras.integer import link_integer
        from .keras.integer_ops import kernels_of

        model = self.keras_model
        fn = tf.function(lambda *xs: model(xs[0] if len(xs) == 1 else list(xs), training=False))
        if kernels is None or not self.integer:
            return lambda *xs: tf.nest.flatten(fn(*[tf.constant(x, tf.float32) for x in xs]))
        own = kernels_of(model)

        def run(*xs):
            link_integer(model, kernels)  # the choice is read while tracing: traced once per kernel set
            try:
                return tf.nest.flatten(fn(*[tf.constant(x, tf.float32) for x in xs]))
            finally:
                link_integer(model, own)

        return run

    def simulated(self, kernels: Optional[str]) -> Optional[str]:
        """The kernel set :meth:`simulate` computes for ``kernels`` (None: no integer kernels, or a SavedModel)."""
        if self.keras_model is None or not self.integer:
            return None
        from .keras.integer_ops import kernels_of

        return kernels or kernels_of(self.keras_model)

    def simulate(self, inputs: Sequence[np.ndarray], batch: int = 64, kernels: Optional[str] = None
                 ) -> List[np.ndarray]:
        """The simulation's outputs; ``kernels``: the integer kernel set to compute (default: the model's)."""
        run = self._run
        if kernels is not None and self.keras_model is not None:
            if kernels not in self._runs:
                self._runs[kernels] = self._keras_run(kernels)
            run = self._runs[kernels]
        outs: List[List[np.ndarray]] = []
        for start in range(0, inputs[0].shape[0], batch):
            flat = [np.asarray(t) for t in run(*[x[start:start + batch] for x in inputs])]
            if not outs:
                outs = [[] for _ in flat]
            for k, t in enumerate(flat):
                outs[k].append(t)
        return [np.concatenate(o) for o in outs]


def _link_target_model(model: Any) -> bool:
    """A model quantized with ``target="tflite_int8"`` (it rounds its input) computes the runtime's integer
    kernels at inference (linked again here, with the model's kernel set: idempotent); whether it is such a model."""
    from .keras.integer import eligible_quantize, link_integer

    for x in model.inputs:
        layer = x._keras_history.operation
        if any(eligible_quantize(n.operation) for n in layer._outbound_nodes):
            link_integer(model)
            return True
    return False


def export_tflite(
    model: ModelLike,
    path: PathLike,
    check_data: Optional[ArrayInputs] = None,
    *,
    inference_input_type: TypeLike = "int8",
    inference_output_type: TypeLike = "int8",
    representative_data: Optional[ArrayInputs] = None,
    overwrite: bool = False,
) -> TFLiteReport:
    """Convert a graphquant-quantized Keras model into a fully integer ``.tflite`` file.

    The ranges graphquant learned or calibrated go to the converter as
    FakeQuant ops with constant ranges; tensors without one are calibrated by
    the converter on ``representative_data`` (default ``check_data``), and a
    model that has such tensors needs one of them. The file is written
    atomically (temporary sibling, then rename) with a manifest beside it
    (``PATH.graphquant.json``); an existing file is replaced only with
    ``overwrite=True`` and only if graphquant wrote it.

    Args:
        model: a Keras model made by :func:`graphquant.quantize_model`, a
            ``.keras`` file of one, or a SavedModel folder graphquant
            converted (its ``serving_default`` signature).
        path: the ``.tflite`` file to write.
        check_data: inputs (an array, or a list of arrays for several model
            inputs); the interpreter's outputs (reference and default
            kernels) are compared with the simulation's.
        inference_input_type / inference_output_type: ``"int8"`` (default),
            ``"uint8"`` or ``"float32"`` (the model then quantizes its input /
            dequantizes its output itself).
        representative_data: data for the converter's calibration of tensors
            graphquant does not round.
        overwrite: replace a file graphquant wrote before.

    Returns:
        A :class:`TFLiteReport` (``print(report)``, ``report.to_dict()``).
    """
    _litert()
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    in_t = _tf_dtype(inference_input_type, "inference_input_type")
    out_t = _tf_dtype(inference_output_type, "inference_output_type")
    path = Path(path)
    _check_destination(path, overwrite)
    src = _Source(model)
    n_in = src.n_inputs
    check = None if check_data is None else _as_inputs(check_data, n_in)
    rep = check if representative_data is None else _as_inputs(representative_data, n_in)

    n_fq = _fake_quant_count(src.concrete)
    if n_fq == 0:
        raise ValueError(f"model {src.name!r} has no graphquant activation rounding (no FakeQuant op after "
                         "tracing); quantize it with graphquant.quantize_model first")
    content = _convert(src.concrete, in_t, out_t, rep)
    _write_atomic(path, content, {"source_model": src.name, "inference_input_type": in_t.name,
                                  "inference_output_type": out_t.name})  # fmt: skip
    report = _export_report(os.fspath(path), content, in_t.name, out_t.name, n_fq, rep is not None, src.weight_bits)
    if check is not None:
        report.agreement = agreement(src, content, check)
    return report


def _convert(concrete: Any, in_t: Any, out_t: Any, rep: Optional[List[np.ndarray]]) -> bytes:
    """The ``.tflite`` bytes of ``concrete`` from ``tf.lite.TFLiteConverter``: fully integer (int8 builtins),
    input/output types ``in_t``/``out_t``; ``rep`` (if given) calibrates the tensors without a graphquant range.

    Raises:
        ValueError: one line: what to pass when the converter needs data, else the converter's message.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = in_t
    converter.inference_output_type = out_t
    if rep is not None:
        converter.representative_dataset = lambda: _batches(rep)
    try:
        return converter.convert()
    except Exception as e:  # the converter raises several types; name what to do
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "representative_dataset" in msg:
            raise ValueError(
                "the converter needs data for tensors graphquant does not round (e.g. the model input): pass "
                "check_data= or representative_data=, or quantize with target='tflite_int8'"
            ) from None
        raise ValueError(f"the TFLite converter failed: {msg}") from None


def _export_report(path: str, content: bytes, input_type: str, output_type: str, n_fq: int, calibrated: bool,
                   weight_bits: Optional[int]) -> TFLiteReport:
    """What the written file is (without the agreement): its ops, which of them compute in float, and a note
    on weights rounded to fewer than 8 bits (how many distinct values each output channel kept)."""
    interp = load_interpreter(content)
    counts, float_ops = _op_summary(interp)
    report = TFLiteReport(
        path=path, size=len(content), input_type=input_type, output_type=output_type,
        fully_integer=not float_ops, float_ops=float_ops, ops=counts, graphquant_ranges=n_fq,
        calibrated_by_converter=calibrated,
    )  # fmt: skip
    if float_ops:
        report.notes.append("ops computing in float: " + ", ".join(float_ops))
    bits = weight_bits
    if bits is not None and bits < 8:
        wl = max((o.weight_levels for o in tflite_scales(content).ops), default=0)
        report.notes.append(
            f"weights were rounded to {bits} bits: stored as int8, at most {wl} distinct values per output "
            f"channel (a {bits}-bit grid has {2 ** bits - 1})"
        )
    return report


def _weight_bits(model: Any) -> Optional[int]:
    from .keras.layers import QuantizeWeights

    bits = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, QuantizeWeights):
            bits += [getattr(s["format"], "bits", None) for s in layer.slots]
        fmt = getattr(layer, "weight_format", None)
        if fmt is not None and getattr(fmt, "bits", None):
            bits.append(fmt.bits)
    bits = [b for b in bits if b is not None]
    return min(bits) if bits else None


# --------------------------------------------------------------------------- per-layer comparison
@dataclass
class TensorAgreement:
    tensor: str
    layer: str
    scale: float
    max_diff_lsb: float
    mean_diff_lsb: float
    equal_pct: float

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TFLiteCompareReport:
    """Per rounding point: the interpreter's intermediate int8 tensor against the simulation's."""

    path: str
    kernels: str
    rows: List[TensorAgreement] = field(default_factory=list)
    unmatched: List[str] = field(default_factory=list)

    def table(self) -> str:
        body = [[r.layer, r.tensor[:48], f"{r.scale:.5g}", f"{r.max_diff_lsb:g}", f"{r.mean_diff_lsb:.4f}",
                 f"{r.equal_pct:.3f}"] for r in self.rows]  # fmt: skip
        lines = [f"interpreter ({self.kernels} kernels) vs simulation, per tensor, in LSBs of each tensor's scale"]
        lines += render_table(["layer", "tflite tensor", "scale", "max LSB", "mean LSB", "% equal"], body,
                              right={2, 3, 4, 5})  # fmt: skip
        if self.unmatched:
            lines.append(f"not matched to a tflite tensor: {', '.join(self.unmatched)}")
        return "\n".join(lines)

    __str__ = table

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "kernels": self.kernels, "rows": [r.to_dict() for r in self.rows],
                "unmatched": list(self.unmatched)}  # fmt: skip


def _every_tensor_an_output(tflite: Union[PathLike, bytes]) -> bytes:
    """The model with the output of every op of its main subgraph added to the subgraph's outputs: a delegate
    then writes them out (``experimental_preserve_all_tensors`` keeps only the tensors of undelegated ops)."""
    from tensorflow.lite.tools import flatbuffer_utils

    content = bytes(tflite) if isinstance(tflite, (bytes, bytearray)) else Path(tflite).read_bytes()
    m = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    sg = m.subgraphs[0]
    outs = [int(o) for o in sg.outputs]
    for op in sg.operators:
        outs += [int(o) for o in op.outputs if int(o) not in outs and int(o) >= 0]
    sg.outputs = np.array(outs, dtype=np.int32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(m))


def compare_tflite(model: ModelLike, tflite: Union[PathLike, bytes], data: ArrayInputs, kernels: str = "reference",
                   max_examples: int = 64) -> TFLiteCompareReport:
    """Compare every rounding point of ``model`` (its ``Quantize`` layers) with the interpreter's tensor there.

    With the reference kernels the interpreter runs with
    ``experimental_preserve_all_tensors=True``; with the default kernels
    (XNNPACK delegate, which keeps its intermediate tensors to itself) on a
    copy of the model whose every op output is a model output. The
    simulation computes the matching integer kernels
    (:data:`SIMULATED_KERNELS`). Each graphquant ``Quantize`` layer output is
    matched to the int8 tensor of the same shape whose dequantized values are
    closest (the converter renames tensors after the ops it fused), and the
    difference is given in LSBs of that tensor's scale.
    """
    if isinstance(model, (str, os.PathLike)):
        p = Path(model)
        if not (p.is_file() and p.suffix in (".keras", ".h5")):
            raise ValueError(f"model: {p}: compare_tflite needs the quantized model as a .keras file")
        from .keras.loading import load_keras_file

        model = load_keras_file(p, "model")
    _litert()
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    xs = [x[:max_examples] for x in _as_inputs(data, len(model.inputs))]
    qlayers, sims = _simulated_points(model, xs, kernels)
    candidates = _interpreter_tensors(tflite, kernels, xs)
    report = TFLiteCompareReport(path="<bytes>" if isinstance(tflite, (bytes, bytearray)) else os.fspath(tflite),
                                 kernels=kernels)  # fmt: skip
    for layer, sim in zip(qlayers, sims):
        best = _closest_tensor(sim, candidates)
        if best is None:
            report.unmatched.append(layer.name)
            continue
        d, lsb, s = best
        lsb = np.round(lsb, 3)
        report.rows.append(TensorAgreement(tensor=str(d["name"]), layer=layer.name, scale=float(s),
                                           max_diff_lsb=float(lsb.max()), mean_diff_lsb=float(lsb.mean()),
                                           equal_pct=float(np.mean(lsb < 0.5) * 100)))  # fmt: skip
    return report


def _simulated_points(model: Any, xs: List[np.ndarray], kernels: str) -> Tuple[List[Any], List[np.ndarray]]:
    """The model's ``Quantize`` layers and the simulation's output of each on ``xs``, computed with the integer
    kernel set matching the interpreter's ``kernels`` (:data:`SIMULATED_KERNELS`; the model's own is restored)."""
    import keras

    from .keras.integer_ops import kernels_of
    from .keras.layers import Quantize

    qlayers = [l for l in model.layers if isinstance(l, Quantize)]
    if not qlayers:
        return qlayers, []
    probe = keras.Model(model.inputs, [l.output for l in qlayers])
    integer = _link_target_model(model)
    own = kernels_of(model)
    try:
        return qlayers, _Source(probe).simulate(xs, kernels=SIMULATED_KERNELS[kernels])
    finally:  # the probe shares the model's layers: they compute the model's own kernel set again
        if integer:
            from .keras.integer import link_integer

            link_integer(model, own)


def _interpreter_tensors(tflite: Union[PathLike, bytes], kernels: str, xs: List[np.ndarray]
                         ) -> List[Tuple[Dict[str, Any], np.ndarray, float]]:
    """Run the interpreter (``kernels``) on ``xs`` once; every int8 tensor with a batch axis it can read back, as
    ``(details, dequantized values, scale)``.

    The reference kernels keep every tensor (``experimental_preserve_all_tensors``); the default kernels (XNNPACK
    delegate) run a copy of the model whose every op output is a model output (:func:`_every_tensor_an_output`).
    """
    if kernels == "reference":
        interp = load_interpreter(tflite, kernels, preserve_all_tensors=True)
    else:
        interp = load_interpreter(_every_tensor_an_output(tflite), kernels)
    in_d = interp.get_input_details()
    for d, x in zip(in_d, xs):
        interp.resize_tensor_input(d["index"], x.shape)
    interp.allocate_tensors()
    for d, x in zip(in_d, xs):
        interp.set_tensor(d["index"], _quantize_input(x, d))
    interp.invoke()
    candidates = []
    readable = None if kernels == "reference" else {d["index"] for d in in_d + interp.get_output_details()}
    for d in interp.get_tensor_details():
        s, z = d["quantization"]
        if d["dtype"] != np.int8 or s == 0.0 or (readable is not None and d["index"] not in readable):
            continue
        try:
            v = interp.get_tensor(d["index"])
        except ValueError:
            continue
        if v.ndim == 0 or v.shape[0] != xs[0].shape[0]:
            continue
        candidates.append((d, (v.astype(np.float64) - z) * s, s))
    return candidates


def _closest_tensor(sim: np.ndarray, candidates: List[Tuple[Dict[str, Any], np.ndarray, float]]
                    ) -> Optional[Tuple[Dict[str, Any], np.ndarray, float]]:
    """The interpreter tensor of ``sim``'s shape whose dequantized values are closest to it (least mean difference
    in LSBs; the converter renames tensors after the ops it fused): ``(details, |difference| in LSBs, scale)``,
    or None when no tensor has that shape."""
    best = None
    for d, deq, s in candidates:
        if deq.shape != sim.shape:
            continue
        lsb = np.abs(deq - sim) / s
        score = float(lsb.mean())
        if best is None or score < best[0]:
            best = (score, d, lsb, s)
    return None if best is None else best[1:]
