"""An example model repository for HEP inference-as-a-service workloads.

The repository follows Triton's layout (``REPO/<model>/config.pbtxt``,
``REPO/<model>/1/model.onnx``) plus a model card (``REPO/<model>/README.md``), so the
same directory can be served by arrowinfer or by Triton itself. Every model is built
here with ``onnx.helper``: nothing is downloaded and nothing needs torch.

The models stand in for networks that SONIC ("Services for Optimized Network Inference
on Coprocessors") runs for CMS: they have the inputs, outputs and roughly the cost of
the real thing, but **their weights are random** (seeded, so every build is
byte-identical). Their outputs are meaningless physics-wise; they exist to exercise and
benchmark the serving chain.

================  =====================================  ===================================
model             stands in for                          inputs -> outputs (batch first)
================  =====================================  ===================================
``facile``        FACILE, CMS HCAL energy regression     hits [15] -> energy [1]
``jet_tagger``    ParticleNet / DeepAK8-style tagger     points [100, 2], features [100, 7],
                                                         mask [100, 1] -> probabilities [5]
``toptag_cnn``    CNN top tagger on jet images           image [1, 37, 37] -> probabilities [2]
``identity``      Triton's transport-test model          INPUT0 [1024] -> OUTPUT0 [1024]
``track_sum``     event-level Deep Sets, ragged batching pt [var] (concatenated, with offsets)
                                                         -> score [1], n_tracks [1]
``jet_score``     a per-jet tagger over NanoAOD branches jet [8] -> score [1] (one row a jet)
``event_jets``    Deep Sets event classifier over the    jets [16, 5] (ragged), mask [16, 1]
                  event's NanoAOD jets                   -> probabilities [2]
================  =====================================  ===================================

The last two (`ANALYSIS_MODELS`) read branches that CMS NanoAOD really has
(`JET_SCORE_BRANCHES`, `EVENT_JETS_BRANCHES`), so they run on the open-data sample as it is.

This module only builds and writes ONNX files; it never runs them (only
``arrowinfer.backends`` imports onnxruntime).
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "ALL_MODELS",
    "ANALYSIS_MODELS",
    "EVENT_JETS_BRANCHES",
    "EXAMPLE_MODELS",
    "IR_VERSION",
    "JET_SCORE_BRANCHES",
    "OPSET",
    "build_model",
    "config_text",
    "model_card",
    "write_example_repository",
]

EXAMPLE_MODELS: tuple[str, ...] = ("facile", "jet_tagger", "toptag_cnn", "identity", "track_sum")
"""Names of the SONIC stand-in models, in the order they are written (the default of
:func:`write_example_repository`)."""

ANALYSIS_MODELS: tuple[str, ...] = ("jet_score", "event_jets")
"""Names of the models that read CMS NanoAOD branches as they are (the open-data sample)."""

ALL_MODELS: tuple[str, ...] = EXAMPLE_MODELS + ANALYSIS_MODELS
"""Every example model: what ``arrowinfer examples`` and ``arrowinfer serve`` write."""

OPSET = 17
"""ONNX opset of the default domain used by every example model."""

IR_VERSION = 8
"""ONNX IR version of the example models.

``onnx.helper.make_model`` stamps the newest IR version the installed ``onnx`` knows,
which an older onnxruntime (or Triton's bundled one) refuses to load; IR 8 is the
version that introduced opset 17, so it is the oldest that can carry these models.
"""

_BATCH = "batch"
_VERSION = "1"
_CONFIG = "config.pbtxt"
_MODEL = "model.onnx"
_CARD = "README.md"


# --------------------------------------------------------------------------------------
# Graph building
# --------------------------------------------------------------------------------------


class _Graph:
    """Collects nodes and seeded initializers while a model is being built.

    Parameters
    ----------
    seed : int
        Seed of the ``numpy.random.default_rng`` that draws every weight, so that a
        build is reproducible byte for byte.
    """

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._used: dict[str, int] = {}

    def _unique(self, prefix: str) -> str:
        count = self._used.get(prefix, 0)
        self._used[prefix] = count + 1
        return prefix if count == 0 else f"{prefix}_{count}"

    def constant(self, prefix: str, value: np.ndarray) -> str:
        """Add ``value`` as an initializer and return its name."""
        name = self._unique(prefix)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, prefix: str, shape: tuple[int, ...], *, fan_in: int, gain: float) -> str:
        """Add a normal weight with standard deviation ``gain / sqrt(fan_in)``.

        With ``gain = sqrt(2)`` before a ReLU this is He initialisation, with
        ``gain = 1`` (LeCun/Glorot-like) before a linear output or a softmax: either keeps
        activations of order one through the network, so outputs are finite and a
        softmax is not saturated on inputs of order one.
        """
        std = gain / math.sqrt(fan_in)
        value = self.rng.normal(0.0, std, size=shape).astype(np.float32)
        return self.constant(prefix, value)

    def bias(self, prefix: str, size: int) -> str:
        """Add a small random bias (non-zero, so that no unit is exactly symmetric)."""
        value = self.rng.normal(0.0, 0.05, size=(size,)).astype(np.float32)
        return self.constant(prefix, value)

    def op(
        self,
        op_type: str,
        inputs: list[str],
        *,
        prefix: str | None = None,
        output: str | None = None,
        **attributes: Any,
    ) -> str:
        """Append one single-output node and return its output's name."""
        node_name = self._unique(prefix or op_type)
        out = output or node_name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attributes))
        return out

    def relu(self, x: str, prefix: str) -> str:
        """Return ``max(x, 0)``."""
        return self.op("Relu", [x], prefix=f"{prefix}/relu")

    def dense(
        self,
        x: str,
        n_in: int,
        n_out: int,
        *,
        prefix: str,
        gain: float = math.sqrt(2.0),
        output: str | None = None,
    ) -> str:
        """Return ``x @ W + b`` for a 2-D ``x`` of shape ``[batch, n_in]`` (one Gemm)."""
        w = self.weight(f"{prefix}/W", (n_in, n_out), fan_in=n_in, gain=gain)
        b = self.bias(f"{prefix}/b", n_out)
        return self.op("Gemm", [x, w, b], prefix=f"{prefix}/gemm", output=output)

    def dense_nd(self, x: str, n_in: int, n_out: int, *, prefix: str) -> str:
        """Return ``x @ W + b`` over the last axis of an N-D ``x`` (MatMul + Add).

        Gemm only takes matrices; MatMul broadcasts over the leading (batch, particle)
        axes, which is exactly a per-particle dense layer.
        """
        w = self.weight(f"{prefix}/W", (n_in, n_out), fan_in=n_in, gain=math.sqrt(2.0))
        b = self.bias(f"{prefix}/b", n_out)
        y = self.op("MatMul", [x, w], prefix=f"{prefix}/matmul")
        return self.op("Add", [y, b], prefix=f"{prefix}/add")

    def conv3x3(
        self, x: str, c_in: int, c_out: int, *, prefix: str, gain: float = math.sqrt(2.0)
    ) -> str:
        """Return a 3x3 convolution with zero padding 1 (same spatial size), NCHW."""
        w = self.weight(f"{prefix}/W", (c_out, c_in, 3, 3), fan_in=9 * c_in, gain=gain)
        b = self.bias(f"{prefix}/b", c_out)
        return self.op(
            "Conv",
            [x, w, b],
            prefix=f"{prefix}/conv",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
        )

    def residual_block(self, x: str, channels: int, *, prefix: str) -> str:
        """Return ``relu(x + conv(relu(conv(x))))``, a basic ResNet block."""
        y = self.relu(self.conv3x3(x, channels, channels, prefix=f"{prefix}/a"), f"{prefix}/a")
        # The second convolution starts small (gain 1/2) so that the skip sum, not the
        # branch, dominates: the usual trick that keeps a random ResNet's activations
        # from growing block after block.
        y = self.conv3x3(y, channels, channels, prefix=f"{prefix}/b", gain=0.5)
        y = self.op("Add", [x, y], prefix=f"{prefix}/skip")
        return self.relu(y, prefix)


def _scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _build_facile(g: _Graph) -> None:
    h = g.relu(g.dense("hits", 15, 64, prefix="dense1"), "dense1")
    h = g.relu(g.dense(h, 64, 32, prefix="dense2"), "dense2")
    g.dense(h, 32, 1, prefix="dense3", gain=1.0, output="energy")


def _masked_mean(g: _Graph, h: str, mask: str) -> str:
    """Mean of ``h [B, N, H]`` over the real items (``mask [B, N, 1]`` is 1), as ``[B, H]``."""
    # Multiplying by the mask alone is not enough: a padded slot whose garbage makes h
    # infinite or NaN gives inf * 0 = NaN. Where() drops those slots whatever they hold, so
    # the output depends on the real items only, which the server's pad/truncate step
    # relies on.
    zero = g.constant("zero", _scalar(0.0))
    one = g.constant("one", _scalar(1.0))
    weighted = g.op("Mul", [h, mask], prefix="mask/mul")
    is_pad = g.op("Equal", [mask, zero], prefix="mask/is_pad")
    masked = g.op("Where", [is_pad, zero, weighted], prefix="mask/where")

    # sum(h * mask) / max(sum(mask), 1): the max() keeps a set with no item at all
    # (all-zero mask: a jet without particles, an event without jets) finite, not 0 / 0.
    axis = g.constant("particle_axis", np.array([1], dtype=np.int64))
    total = g.op("ReduceSum", [masked, axis], prefix="pool/sum", keepdims=0)  # [B, H]
    count = g.op("ReduceSum", [mask, axis], prefix="pool/count", keepdims=0)  # [B, 1]
    count = g.op("Max", [count, one], prefix="pool/clamp")
    return g.op("Div", [total, count], prefix="pool/mean")


def _build_jet_tagger(g: _Graph) -> None:
    # Per-particle network phi, shared by all particles (Deep Sets / Energy Flow Network).
    x = g.op("Concat", ["points", "features"], prefix="concat", axis=-1)  # [B, 100, 9]
    h = g.relu(g.dense_nd(x, 9, 64, prefix="phi1"), "phi1")
    h = g.relu(g.dense_nd(h, 64, 64, prefix="phi2"), "phi2")  # [B, 100, 64]
    pooled = _masked_mean(g, h, "mask")

    # Jet-level network F.
    h = g.relu(g.dense(pooled, 64, 32, prefix="f1"), "f1")
    logits = g.dense(h, 32, 5, prefix="f2", gain=1.0)
    g.op("Softmax", [logits], prefix="softmax", output="probabilities", axis=-1)


#: The NanoAOD jet branches ``jet_score`` reads, in order, and their typical centre and
#: spread in CMS open data (so that the network sees inputs of order one).
JET_SCORE_BRANCHES: tuple[str, ...] = (
    "Jet_pt",
    "Jet_eta",
    "Jet_phi",
    "Jet_mass",
    "Jet_btagCSVV2",
    "Jet_qgl",
    "Jet_area",
    "Jet_nConstituents",
)
_JET_CENTRE = (30.0, 0.0, 0.0, 5.0, -5.0, 0.0, 0.5, 12.0)
_JET_SPREAD = (25.0, 2.3, 1.8, 3.0, 5.0, 0.8, 0.05, 5.5)

#: The NanoAOD jet branches of each jet that ``event_jets`` reads, in order.
EVENT_JETS_BRANCHES: tuple[str, ...] = (
    "Jet_pt",
    "Jet_eta",
    "Jet_phi",
    "Jet_mass",
    "Jet_btagCSVV2",
)
_EVENT_JETS_MAX = 16


def _standardise(g: _Graph, x: str, centre: tuple[float, ...], spread: tuple[float, ...]) -> str:
    """``(x - centre) / spread`` per feature (the last axis)."""
    c = g.constant("norm/centre", np.array(centre, dtype=np.float32))
    s = g.constant("norm/spread", np.array(spread, dtype=np.float32))
    return g.op("Div", [g.op("Sub", [x, c], prefix="norm/sub"), s], prefix="norm/div")


def _build_jet_score(g: _Graph) -> None:
    x = _standardise(g, "jet", _JET_CENTRE, _JET_SPREAD)
    h = g.relu(g.dense(x, 8, 32, prefix="dense1"), "dense1")
    h = g.relu(g.dense(h, 32, 32, prefix="dense2"), "dense2")
    logit = g.dense(h, 32, 1, prefix="dense3", gain=1.0)
    g.op("Sigmoid", [logit], prefix="sigmoid", output="score")


def _build_event_jets(g: _Graph) -> None:
    x = _standardise(g, "jets", _JET_CENTRE[:5], _JET_SPREAD[:5])  # [B, 16, 5]
    h = g.relu(g.dense_nd(x, 5, 32, prefix="phi1"), "phi1")
    h = g.relu(g.dense_nd(h, 32, 32, prefix="phi2"), "phi2")  # [B, 16, 32]
    pooled = _masked_mean(g, h, "mask")
    h = g.relu(g.dense(pooled, 32, 16, prefix="f1"), "f1")
    logits = g.dense(h, 16, 2, prefix="f2", gain=1.0)
    g.op("Softmax", [logits], prefix="softmax", output="probabilities", axis=-1)


def _build_toptag_cnn(g: _Graph) -> None:
    x = g.relu(g.conv3x3("image", 1, 16, prefix="stem"), "stem")  # [B, 16, 37, 37]
    x = g.residual_block(x, 16, prefix="block1")
    x = g.op("MaxPool", [x], prefix="pool", kernel_shape=[2, 2], strides=[2, 2])  # 18x18
    x = g.relu(g.conv3x3(x, 16, 32, prefix="widen"), "widen")  # [B, 32, 18, 18]
    x = g.residual_block(x, 32, prefix="block2")
    x = g.op("GlobalAveragePool", [x], prefix="gap")  # [B, 32, 1, 1]
    x = g.op("Flatten", [x], prefix="flatten", axis=1)  # [B, 32]
    logits = g.dense(x, 32, 2, prefix="head", gain=1.0)
    g.op("Softmax", [logits], prefix="softmax", output="probabilities", axis=-1)


def _build_track_sum(g: _Graph) -> None:
    # "pt" is every event's tracks concatenated ([values]); "offsets" ([events + 1]) says
    # where each event's tracks start, as Triton's batch input WITH_ZERO gives it.
    x = g.op("Unsqueeze", ["pt", g.constant("axis1", np.array([1], np.int64))], prefix="col")
    h = g.relu(g.dense(x, 1, 16, prefix="phi1"), "phi1")  # per track: [values, 16]
    y = g.dense(h, 16, 1, prefix="phi2", gain=1.0)  # [values, 1]
    y = g.op("Flatten", [y], prefix="flat", axis=0)  # [1, values]
    y = g.op("Squeeze", [y, g.constant("axis0", np.array([0], np.int64))], prefix="vec")
    offsets = g.op("Cast", ["offsets"], prefix="offsets64", to=TensorProto.INT64)
    first = g.constant("first", np.array([0], np.int64))
    second = g.constant("second", np.array([1], np.int64))
    last = g.constant("last", np.array([-1], np.int64))
    end = g.constant("end", np.array([np.iinfo(np.int64).max], np.int64))
    starts = g.op("Slice", [offsets, first, last, first], prefix="starts")  # [events]
    ends = g.op("Slice", [offsets, second, end, first], prefix="ends")  # [events]
    # Each track's event: mark where events 1.. start, then an (exact) integer cumsum.
    # A float cumsum over the batch would make an event's sum depend on the events
    # before it; this way every event is summed alone, whatever it is batched with.
    inner = g.op("Slice", [offsets, second, last, first], prefix="inner_starts")
    ones = g.op("Add", [g.op("Sub", [inner, inner]), second], prefix="ones")
    slots = g.op("Add", [g.op("Shape", ["pt"]), second], prefix="slots")  # values + 1
    zeros = g.op(
        "ConstantOfShape",
        [slots],
        prefix="zeros",
        value=helper.make_tensor("zero_i", TensorProto.INT64, [1], [0]),
    )
    marks = g.op("ScatterElements", [zeros, inner, ones], prefix="marks", reduction="add")
    event = g.op("CumSum", [marks, g.constant("axis", np.array(0, np.int64))], prefix="event")
    event = g.op("Slice", [event, first, last, first], prefix="event_of_track")  # [values]
    empty = g.op(
        "ConstantOfShape",
        [g.op("Shape", [ends])],
        prefix="sum0",
        value=helper.make_tensor("zero_f", TensorProto.FLOAT, [1], [0.0]),
    )
    sums = g.op("ScatterElements", [empty, event, y], prefix="segment_sum", reduction="add")
    count = g.op("Cast", [g.op("Sub", [ends, starts], prefix="n")], prefix="nf", to=1)
    mean = g.op("Div", [sums, g.op("Max", [count, g.constant("one", _scalar(1.0))])])
    g.op("Unsqueeze", [mean, second], prefix="score", output="score")  # [events, 1]
    g.op("Unsqueeze", [count, second], prefix="n_tracks", output="n_tracks")


def _build_identity(g: _Graph) -> None:
    g.op("Identity", ["INPUT0"], prefix="identity", output="OUTPUT0")


# --------------------------------------------------------------------------------------
# Model specifications: one table drives the ONNX graph, config.pbtxt and the card
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    dims: tuple[int, ...]  # without the batch dimension
    doc: str


@dataclass(frozen=True)
class _Spec:
    seed: int
    title: str
    inputs: tuple[_Tensor, ...]
    outputs: tuple[_Tensor, ...]
    build: Callable[[_Graph], None]
    max_batch_size: int
    # The config's dynamic_batching message.
    max_queue_delay_us: int
    # arrowinfer's and the backend's own settings (the config's parameters map).
    parameters: tuple[tuple[str, str], ...]
    stands_in_for: str
    architecture: str
    serving: str
    references: tuple[str, ...]
    preferred_batch_sizes: tuple[int, ...] = ()
    # Triton's ragged batching: inputs with allow_ragged_batch (1-D in the graph, every
    # event's values concatenated) and the batch inputs (kind, target, source) the server
    # makes for them (INT32, 1-D).
    ragged_batch: tuple[str, ...] = ()
    batch_inputs: tuple[tuple[str, str, str], ...] = ()


_SONIC_GPU = (
    'J. Krupa et al., "GPU coprocessors as a service for deep learning inference in '
    'high energy physics", Mach. Learn.: Sci. Technol. 2 (2021) 035005.'
)
_SONIC_FPGA = (
    'J. Duarte et al., "FPGA-accelerated machine learning inference as a service for '
    'particle physics computing", Comput. Softw. Big Sci. 3 (2019) 13.'
)
_SONIC_CMS = (
    'CMS Collaboration, "Portable acceleration of CMS computing workflows with '
    'coprocessors as a service", Comput. Softw. Big Sci. 8 (2024) 17.'
)

_PARTICLENET = (
    'H. Qu and L. Gouskos, "ParticleNet: Jet Tagging via Particle Clouds", '
    "Phys. Rev. D 101 (2020) 056019."
)
_DEEPAK8 = (
    'CMS Collaboration, "Identification of heavy, energetic, hadronically decaying '
    'particles using machine-learning techniques", JINST 15 (2020) P06005.'
)
_EFN = (
    'P. T. Komiske, E. M. Metodiev and J. Thaler, "Energy Flow Networks: Deep Sets for '
    'Particle Jets", JHEP 01 (2019) 121.'
)

_SPECS: dict[str, _Spec] = {
    "facile": _Spec(
        seed=20190001,
        title="FACILE stand-in: HCAL energy regression",
        inputs=(_Tensor("hits", (15,), "per-channel inputs of one HCAL channel"),),
        outputs=(_Tensor("energy", (1,), "regressed channel energy"),),
        build=_build_facile,
        max_batch_size=16384,
        # no delay: merge whatever is queued, never hold a lone request back
        max_queue_delay_us=0,
        parameters=(),
        stands_in_for=(
            "FACILE, the small fully connected network that CMS studied for the local\n"
            "energy reconstruction of the hadron calorimeter (HCAL) in the SONIC GPU\n"
            "studies. It runs once per HCAL channel, so one event makes a batch of\n"
            "thousands of tiny requests: a test of per-request overhead and batching,\n"
            "not of compute."
        ),
        architecture=(
            "Multilayer perceptron 15 -> 64 -> 32 -> 1 (Gemm layers, ReLU between them,\n"
            "linear output)."
        ),
        serving=(
            "`max_batch_size: 16384` (a whole event's channels in one batch), dynamic\n"
            "batching with a 100 us queue delay, one CPU instance."
        ),
        references=(_SONIC_GPU, _SONIC_CMS),
    ),
    "jet_tagger": _Spec(
        seed=20190002,
        title="Jet tagger stand-in: Deep Sets over jet constituents",
        inputs=(
            _Tensor("points", (100, 2), "constituent (eta, phi) relative to the jet axis"),
            _Tensor("features", (100, 7), "constituent features (pT, energy, charge, ...)"),
            _Tensor("mask", (100, 1), "1 for a real constituent, 0 for padding"),
        ),
        outputs=(_Tensor("probabilities", (5,), "class probabilities (softmax over 5 classes)"),),
        build=_build_jet_tagger,
        max_batch_size=1024,
        max_queue_delay_us=500,
        preferred_batch_sizes=(64, 256),
        parameters=(
            ("arrowinfer.ragged_inputs", "points,features"),
            ("arrowinfer.mask_input", "mask"),
            ("arrowinfer.pad_value", "0"),
        ),
        stands_in_for=(
            "Particle-based jet taggers such as ParticleNet and DeepAK8, which CMS runs\n"
            "as a service in SONIC. Like them it takes up to 100 constituents per jet\n"
            "with coordinates, features and a padding mask, and returns class\n"
            "probabilities. The real taggers use edge convolutions or 1-D convolutions;\n"
            "this one is a permutation-invariant Deep Sets (Energy Flow) network, which\n"
            "has the same interface and the same padding contract."
        ),
        architecture=(
            "Per-constituent MLP on concat(points, features): 9 -> 64 -> 64 with ReLU;\n"
            "padded constituents (mask 0) are removed (`Where(mask == 0, 0, h * mask)`,\n"
            "which also drops non-finite garbage); masked mean over constituents,\n"
            "`sum(h * mask) / max(sum(mask), 1)`; jet-level MLP 64 -> 32 -> 5 with ReLU;\n"
            "Softmax over the last axis. Padded slots cannot change the output, whatever\n"
            "they hold."
        ),
        serving=(
            "`max_batch_size: 1024`, dynamic batching with a 500 us queue delay and\n"
            "preferred batch sizes 64 and 256, one CPU instance. Its parameters tell the\n"
            "arrowinfer server that clients send `points` and `features` as ragged\n"
            "per-jet lists (`arrowinfer.ragged_inputs`): the server pads or truncates\n"
            "them to 100 constituents with `arrowinfer.pad_value` and fills the\n"
            "`arrowinfer.mask_input` tensor `mask` itself."
        ),
        references=(_PARTICLENET, _DEEPAK8, _EFN, _SONIC_CMS),
    ),
    "toptag_cnn": _Spec(
        seed=20190003,
        title="Top tagger stand-in: small ResNet on jet images",
        inputs=(_Tensor("image", (1, 37, 37), "jet image, one channel (pT per pixel)"),),
        outputs=(_Tensor("probabilities", (2,), "(QCD, top) probabilities"),),
        build=_build_toptag_cnn,
        max_batch_size=256,
        max_queue_delay_us=1000,
        parameters=(("intra_op_thread_count", "2"),),
        stands_in_for=(
            "The ResNet-50-based top-quark tagger on jet images that the SONIC FPGA and\n"
            "GPU papers served, scaled down to a 37 x 37 single-channel image and two\n"
            "residual stages. About 14 million multiply-adds per jet: compute, not\n"
            "transport, dominates its latency."
        ),
        architecture=(
            "Conv 1 -> 16 (3x3, pad 1), ReLU; residual block at 16 channels (Conv, ReLU,\n"
            "Conv, add skip, ReLU); MaxPool 2x2 (37 -> 18); Conv 16 -> 32 (3x3, pad 1),\n"
            "ReLU; residual block at 32 channels; GlobalAveragePool; Flatten; Gemm\n"
            "32 -> 2; Softmax."
        ),
        serving=(
            "`max_batch_size: 256`, dynamic batching with a 1 ms queue delay, one CPU\n"
            "instance; `intra_op_thread_count: 2` is passed to onnxruntime's session\n"
            "options."
        ),
        references=(_SONIC_FPGA, _SONIC_GPU),
    ),
    "identity": _Spec(
        seed=20190004,
        title="Identity: transport benchmark model",
        inputs=(_Tensor("INPUT0", (1024,), "any payload, 4 KiB per event"),),
        outputs=(_Tensor("OUTPUT0", (1024,), "INPUT0, unchanged"),),
        build=_build_identity,
        max_batch_size=16384,
        max_queue_delay_us=0,
        parameters=(),
        stands_in_for=(
            "Nothing physical: like the `identity`/`simple` models of Triton's examples\n"
            "(and their INPUT0/OUTPUT0 names) it returns its input, so that a benchmark\n"
            "measures transport and batching alone. It has no weights."
        ),
        architecture="One ONNX `Identity` node.",
        serving=(
            "`max_batch_size: 16384`, dynamic batching with no queue delay, one CPU\ninstance."
        ),
        references=(_SONIC_CMS,),
    ),
    "track_sum": _Spec(
        seed=20190007,
        title="Track sum: an event-level Deep Sets over ragged tracks, without padding",
        inputs=(_Tensor("pt", (-1,), "transverse momenta of the event's tracks (any number)"),),
        outputs=(
            _Tensor("score", (1,), "mean over the event's tracks of a per-track MLP"),
            _Tensor("n_tracks", (1,), "number of tracks of the event"),
        ),
        build=_build_track_sum,
        max_batch_size=4096,
        max_queue_delay_us=100,
        parameters=(),
        ragged_batch=("pt",),
        batch_inputs=(("BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO", "offsets", "pt"),),
        stands_in_for=(
            "Event- or jet-level networks over a variable number of constituents, served\n"
            "the way CMS asked Triton for: with ragged batching, the events of many\n"
            "requests are concatenated into one tensor without padding, and the model\n"
            "reads each event's extent from an offsets tensor the server makes."
        ),
        architecture=(
            "Per-track MLP 1 -> 16 -> 1 (ReLU) on the concatenated `pt` values; per-event\n"
            "mean: each track's event from the offsets (an integer cumsum of event starts),\n"
            "a ScatterElements sum per event, divided by `max(n, 1)` (an event without\n"
            "tracks scores 0). Each event is summed alone: batching changes no bit."
        ),
        serving=(
            "`max_batch_size: 4096`, dynamic batching with a 100 us queue delay, one CPU\n"
            "instance. `pt` has `allow_ragged_batch: true`, and the `batch_input`\n"
            "`offsets` (BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO, INT32, `[events + 1]`)\n"
            "is made by the server. Over Arrow Flight each event is a list of `pt`; over\n"
            "KServe a request is `[1, n]` (or `[k, n]`: k events of n tracks each)."
        ),
        references=(_SONIC_CMS,),
    ),
    "jet_score": _Spec(
        seed=20190005,
        title="Per-jet tagger over NanoAOD jet branches",
        inputs=(
            _Tensor(
                "jet",
                (len(JET_SCORE_BRANCHES),),
                "one jet: " + ", ".join(f"`{b}`" for b in JET_SCORE_BRANCHES),
            ),
        ),
        outputs=(_Tensor("score", (1,), "tag score in (0, 1) (sigmoid)"),),
        build=_build_jet_score,
        max_batch_size=65536,
        max_queue_delay_us=100,
        parameters=(),
        stands_in_for=(
            "A per-jet tagger of a NanoAOD analysis (b or quark/gluon tagging refined from\n"
            "the jet's kinematics and its stored tagger outputs). It reads eight branches\n"
            "that CMS NanoAOD really has for every jet, so it runs on the CMS open-data\n"
            "sample as it is: one request row per jet, e.g.\n"
            "`arrowinfer infer URL jet_score FILE.root out.parquet "
            "--input jet=" + ",".join(JET_SCORE_BRANCHES) + "`\n"
            "(the scores come back as one list per event, one value per jet)."
        ),
        architecture=(
            "Fixed standardisation `(x - centre) / spread` per feature (typical values of\n"
            "open-data jets, in the graph), then an MLP 8 -> 32 -> 32 -> 1 with ReLU and a\n"
            "Sigmoid output."
        ),
        serving=(
            "`max_batch_size: 65536` (all jets of a chunk of events in one batch), dynamic\n"
            "batching with a 100 us queue delay, one CPU instance."
        ),
        references=(_DEEPAK8, _SONIC_CMS),
    ),
    "event_jets": _Spec(
        seed=20190006,
        title="Event classifier: Deep Sets over each event's NanoAOD jets",
        inputs=(
            _Tensor(
                "jets",
                (_EVENT_JETS_MAX, len(EVENT_JETS_BRANCHES)),
                "the event's jets: " + ", ".join(f"`{b}`" for b in EVENT_JETS_BRANCHES),
            ),
            _Tensor("mask", (_EVENT_JETS_MAX, 1), "1 for a real jet, 0 for padding"),
        ),
        outputs=(_Tensor("probabilities", (2,), "(background, signal) probabilities"),),
        build=_build_event_jets,
        max_batch_size=4096,
        max_queue_delay_us=200,
        parameters=(
            ("arrowinfer.ragged_inputs", "jets"),
            ("arrowinfer.mask_input", "mask"),
            ("arrowinfer.pad_value", "0"),
        ),
        stands_in_for=(
            "An event-level classifier over the set of jets of each event (a ttbar vs\n"
            "background discriminant, say), permutation invariant as Deep Sets / Energy\n"
            "Flow Networks are. Clients send each event's jets as a ragged list, only the\n"
            "real jets travel, e.g. `--input jets=" + ",".join(EVENT_JETS_BRANCHES) + "`;\n"
            "an event without jets is fine (its mask is all zero)."
        ),
        architecture=(
            "Fixed standardisation per feature; per-jet MLP 5 -> 32 -> 32 with ReLU;\n"
            "masked mean over the jets, `sum(h * mask) / max(sum(mask), 1)` (padded slots\n"
            "cannot change the output, whatever they hold); event MLP 32 -> 16 -> 2 with\n"
            "ReLU; Softmax."
        ),
        serving=(
            f"`max_batch_size: 4096`, dynamic batching with a 200 us queue delay. The\n"
            f"server pads or truncates each event's jets to {_EVENT_JETS_MAX} "
            "(`arrowinfer.ragged_inputs`) and\n"
            "fills `mask` itself (`arrowinfer.mask_input`)."
        ),
        references=(_EFN, _SONIC_CMS),
    ),
}


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown example model {name!r}; expected one of {', '.join(ALL_MODELS)}"
        ) from None


def _shape(dims: tuple[int, ...]) -> str:
    return "[" + ", ".join([_BATCH, *map(str, dims)]) + "]"


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def build_model(name: str) -> onnx.ModelProto:
    """Build one example model as an ONNX model.

    Parameters
    ----------
    name : str
        One of `EXAMPLE_MODELS`.

    Returns
    -------
    onnx.ModelProto
        A checked model (``onnx.checker.check_model(..., full_check=True)``), opset
        `OPSET`, IR version `IR_VERSION`. Every tensor is float32 and the first
        dimension of every input and output is the symbolic ``"batch"``. The weights are
        random but seeded: two builds serialize to the same bytes.

    Raises
    ------
    ValueError
        If `name` is not an example model.
    """
    spec = _spec(name)
    g = _Graph(spec.seed)
    spec.build(g)
    graph = helper.make_graph(
        g.nodes,
        name,
        inputs=[
            helper.make_tensor_value_info(
                t.name,
                TensorProto.FLOAT,
                ["values"] if t.name in spec.ragged_batch else [_BATCH, *t.dims],
            )
            for t in spec.inputs
        ]
        + [
            helper.make_tensor_value_info(target, TensorProto.INT32, [f"{target}_size"])
            for _, target, _ in spec.batch_inputs
        ],
        outputs=[
            helper.make_tensor_value_info(t.name, TensorProto.FLOAT, [_BATCH, *t.dims])
            for t in spec.outputs
        ],
        initializer=g.initializers,
        doc_string=f"{spec.title}. Random weights: outputs carry no physics meaning.",
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="arrowinfer.examples",
        doc_string=f"arrowinfer example model {name!r}: {spec.title}.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            "arrowinfer.example": name,
            "weights": f"random (numpy default_rng seed {spec.seed}), not trained",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def config_text(name: str) -> str:
    """Return the Triton model configuration of an example model.

    Parameters
    ----------
    name : str
        One of `ALL_MODELS`.

    Returns
    -------
    str
        Triton's ``ModelConfig`` (the generated protobuf class) printed in protobuf text
        format, the content of ``config.pbtxt``, after two comment lines: platform
        ``onnxruntime_onnx``, inputs and outputs as in the ONNX graph (without the batch
        dimension, which ``max_batch_size`` implies), dynamic batching, one CPU instance
        and the model's ``parameters``.

    Raises
    ------
    ValueError
        If `name` is not an example model.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    spec = _spec(name)
    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=spec.max_batch_size,
        input=[
            mc.ModelInput(
                name=t.name,
                data_type=mc.TYPE_FP32,
                dims=t.dims,
                allow_ragged_batch=t.name in spec.ragged_batch,
            )
            for t in spec.inputs
        ],
        batch_input=[
            mc.BatchInput(
                kind=mc.BatchInput.Kind.Value(kind),
                target_name=[target],
                data_type=mc.TYPE_INT32,
                source_input=[source],
            )
            for kind, target, source in spec.batch_inputs
        ],
        output=[
            mc.ModelOutput(name=t.name, data_type=mc.TYPE_FP32, dims=t.dims) for t in spec.outputs
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=spec.max_queue_delay_us,
            preferred_batch_size=spec.preferred_batch_sizes,
        ),
        instance_group=[mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.Kind.KIND_CPU)],
    )
    for key, value in spec.parameters:
        config.parameters[key].string_value = value
    header = (
        f"# arrowinfer example model {name!r}: {spec.title}.\n"
        "# The weights are random: outputs are meaningless physics-wise (see README.md).\n"
    )
    return header + text_format.MessageToString(config)


def model_card(name: str) -> str:
    """Return the model card (``README.md``) of an example model.

    Parameters
    ----------
    name : str
        One of `EXAMPLE_MODELS`.

    Returns
    -------
    str
        Markdown: what the model stands in for, its inputs and outputs with shapes, its
        architecture and serving settings, references, and the warning that its weights
        are random.

    Raises
    ------
    ValueError
        If `name` is not an example model.
    """
    spec = _spec(name)

    def table(items: tuple[_Tensor, ...]) -> list[str]:
        rows = ["| name | type | shape | meaning |", "|---|---|---|---|"]
        rows += [f"| `{t.name}` | FP32 | `{_shape(t.dims)}` | {t.doc} |" for t in items]
        return rows

    lines = [
        f"# `{name}`: {spec.title}",
        "",
        "An example model of arrowinfer's example repository, written by",
        "`arrowinfer.examples.write_example_repository`.",
        "",
        "> **Warning: the weights are random.** They are drawn from a seeded normal",
        f"> distribution (numpy `default_rng({spec.seed})`), not trained. The model has",
        "> the interface and roughly the cost of the network it stands in for, but its",
        "> outputs are meaningless physics-wise: use it to test and benchmark serving,",
        "> never for physics.",
        "",
        "## Stands in for",
        "",
        spec.stands_in_for,
        "",
        "## Inputs",
        "",
        *table(spec.inputs),
        "",
        "## Outputs",
        "",
        *table(spec.outputs),
        "",
        f"`{_BATCH}` is the batch dimension; `config.pbtxt` lists the other dimensions.",
        "",
        "## Architecture",
        "",
        spec.architecture,
        "",
        f"ONNX opset {OPSET}, IR version {IR_VERSION}, float32 throughout.",
        "",
        "## Serving",
        "",
        spec.serving,
        "",
        "## References",
        "",
        *[f"- {ref}" for ref in spec.references],
        "",
    ]
    return "\n".join(lines)


def write_example_repository(
    directory: str | os.PathLike[str],
    *,
    models: Iterable[str] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write the example model repository in Triton's layout.

    For every model this writes ``DIR/<model>/1/model.onnx``, ``DIR/<model>/README.md``
    and, last, ``DIR/<model>/config.pbtxt``. Each file is written to a temporary file
    beside it and renamed into place, so a server that reads the repository while it is
    being written never sees a half-written file.

    Parameters
    ----------
    directory : str or os.PathLike
        The repository root; created if missing.
    models : iterable of str, optional
        Which of `EXAMPLE_MODELS` to write; all of them by default.
    overwrite : bool, default False
        Rewrite models that are already there. Without it a complete model directory
        is left as it is (so local edits survive), and an incomplete one (a file missing
        or empty) is completed.

    Returns
    -------
    pathlib.Path
        `directory`, as a path.

    Raises
    ------
    TypeError
        If `models` is a single string rather than an iterable of names.
    ValueError
        If a name in `models` is not an example model.
    """
    if isinstance(models, str):
        raise TypeError(
            f"models must be an iterable of model names, got the string {models!r}; "
            f"use models=[{models!r}]"
        )
    names = EXAMPLE_MODELS if models is None else tuple(models)  # see ALL_MODELS
    for name in names:
        _spec(name)  # fail before writing anything

    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for name in dict.fromkeys(names):
        model_dir = root / name
        config = model_dir / _CONFIG
        onnx_file = model_dir / _VERSION / _MODEL
        card = model_dir / _CARD
        complete = all(p.is_file() and p.stat().st_size > 0 for p in (config, onnx_file, card))
        if complete and not overwrite:
            continue
        onnx_file.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(onnx_file, build_model(name).SerializeToString())
        _write_atomic(card, model_card(name).encode())
        # config.pbtxt goes last: a repository poller that keys on it then finds the
        # model file already in place.
        _write_atomic(config, config_text(name).encode())
    return root


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; a server running as another user (a container)
        # must be able to read the repository.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
