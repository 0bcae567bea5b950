"""Arrow schemas of the example event data, synthetic events, and readers for ROOT files.

The example models of arrowinfer take four kinds of input, one Arrow schema each:

====================  ============  =====================================================
name                  one row per   columns
====================  ============  =====================================================
``nanoaod_jets``      event         NanoAOD jet collection as ragged lists, event ids
``hcal_hits``         event         HCAL hits: ``list<fixed_size_list<float32, 15>>``
``jet_constituents``  jet           ParticleNet inputs: points and features per particle
``jet_images``        jet           37x37 calorimeter image (``arrow.fixed_shape_tensor``)
====================  ============  =====================================================

The schemas below are the source of truth; ``schemas/*.schema.arrow`` in the repository are
written from them (``python -m arrowinfer.events write-schemas schemas/``) so that programs in
other languages can read them with any Arrow IPC reader.

Ragged collections are Arrow lists with 32-bit offsets whose items are never null, as
``awkward.to_arrow_table(..., list_to32=True, extensionarray=False)`` gives them for NanoAOD
files. Units and feature names are in the field metadata (JSON values, UTF-8 keys).

The synthetic generators are seeded (``numpy.random.default_rng(seed)``) and vectorised: they
draw multiplicities, build offsets with :func:`numpy.cumsum` and flat value arrays, and hand
both to :meth:`pyarrow.ListArray.from_arrays`, so making a million jets costs no Python loop.
The record batches they return have exactly the schemas here, metadata included.

``uproot`` and ``awkward`` are optional (``pip install 'arrowinfer[awkward]'``); they are
imported only by :func:`read_events` and :func:`read_nanoaod`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import operator
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "CONSTITUENT_FEATURES",
    "HCAL_HITS",
    "HCAL_HIT_FEATURES",
    "JET_CONSTITUENTS",
    "JET_IMAGES",
    "JET_IMAGE_SHAPE",
    "NANOAOD_JETS",
    "SCHEMAS",
    "main",
    "read_events",
    "read_nanoaod",
    "shared_data_dir",
    "synthetic",
    "synthetic_hcal_hits",
    "synthetic_jet_constituents",
    "synthetic_jet_images",
    "synthetic_jets",
    "write_schemas",
]

# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def _meta(**items: object) -> dict[str, str]:
    """Field or schema metadata: strings stay as they are, anything else becomes JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in items.items()}


def _float_list() -> pa.DataType:
    # The item field is named "item" and non-null, as awkward writes NanoAOD branches; the
    # schema then equals what read_nanoaod returns, not just "castable to".
    return pa.list_(pa.field("item", pa.float32(), nullable=False))


def _fixed_float_list(size: int) -> pa.DataType:
    return pa.list_(pa.field("item", pa.float32(), nullable=False), size)


def _list_of_vectors(size: int) -> pa.DataType:
    return pa.list_(pa.field("item", _fixed_float_list(size), nullable=False))


NANOAOD_JETS: pa.Schema = pa.schema(
    [
        pa.field("run", pa.uint32(), nullable=False, metadata=_meta(description="run number")),
        pa.field(
            "luminosityBlock",
            pa.uint32(),
            nullable=False,
            metadata=_meta(description="luminosity section within the run"),
        ),
        pa.field("event", pa.uint64(), nullable=False, metadata=_meta(description="event number")),
        # NanoAOD stores counters as unsigned 32-bit integers; keeping uint32 lets the
        # reader pass real files through without a lossy cast.
        pa.field(
            "nJet",
            pa.uint32(),
            nullable=False,
            metadata=_meta(description="number of jets; equals the length of every Jet_* list"),
        ),
        pa.field(
            "Jet_pt",
            _float_list(),
            nullable=False,
            metadata=_meta(unit="GeV", description="jet transverse momentum, descending"),
        ),
        pa.field(
            "Jet_eta",
            _float_list(),
            nullable=False,
            metadata=_meta(unit="1", description="jet pseudorapidity"),
        ),
        pa.field(
            "Jet_phi",
            _float_list(),
            nullable=False,
            metadata=_meta(unit="rad", description="jet azimuth in [-pi, pi)"),
        ),
        pa.field(
            "Jet_mass",
            _float_list(),
            nullable=False,
            metadata=_meta(unit="GeV", description="jet invariant mass"),
        ),
        pa.field(
            "Jet_btagDeepB",
            _float_list(),
            nullable=False,
            metadata=_meta(
                unit="1", description="DeepCSV b+bb discriminator in [0, 1], -1 where not computed"
            ),
        ),
    ],
    metadata=_meta(
        name="nanoaod_jets",
        row="event",
        description="CMS NanoAOD jet collection, one row per event, jets as ragged lists",
    ),
)
"""One row per event: NanoAOD's ``Jet`` collection as ragged ``list<float32>`` columns."""

#: The 15 per-hit inputs of a FACILE-like HCAL energy regression (Krupa et al.,
#: arXiv:2007.10359): raw charges of the 8 time samples of the Phase-1 digi, the pedestal and
#: gain of the channel, the "method 0" energy and time, and the channel's coordinates.
HCAL_HIT_FEATURES: tuple[str, ...] = (
    *(f"charge_ts{i}" for i in range(8)),
    "pedestal",
    "gain",
    "raw_energy",
    "time",
    "ieta",
    "iphi",
    "depth",
)

_HCAL_HIT_UNITS: tuple[str, ...] = (
    *("fC",) * 8,
    "fC",
    "GeV/fC",
    "GeV",
    "ns",
    "1",
    "1",
    "1",
)

HCAL_HITS: pa.Schema = pa.schema(
    [
        pa.field(
            "hits",
            _list_of_vectors(len(HCAL_HIT_FEATURES)),
            nullable=False,
            metadata=_meta(
                features=list(HCAL_HIT_FEATURES),
                units=list(_HCAL_HIT_UNITS),
                description="one entry per HCAL channel with a digi above threshold",
            ),
        ),
    ],
    metadata=_meta(
        name="hcal_hits",
        row="event",
        description="HCAL hits of one event, 15 float32 features per hit (FACILE-like)",
    ),
)
"""One row per event: ``hits`` is ``list<fixed_size_list<float32, 15>>``, features as in
:data:`HCAL_HIT_FEATURES`."""

#: The 7 per-particle features of ParticleNet for top tagging (Qu and Gouskos,
#: arXiv:1902.08570, table 2), relative to the jet axis.
CONSTITUENT_FEATURES: tuple[str, ...] = (
    "delta_eta",
    "delta_phi",
    "log_pt",
    "log_e",
    "log_pt_rel",
    "log_e_rel",
    "delta_r",
)

JET_CONSTITUENTS: pa.Schema = pa.schema(
    [
        pa.field(
            "points",
            _list_of_vectors(2),
            nullable=False,
            metadata=_meta(
                features=["delta_eta", "delta_phi"],
                units=["1", "rad"],
                description="particle coordinates relative to the jet axis (EdgeConv points)",
            ),
        ),
        pa.field(
            "features",
            _list_of_vectors(len(CONSTITUENT_FEATURES)),
            nullable=False,
            metadata=_meta(
                features=list(CONSTITUENT_FEATURES),
                units=["1", "rad", "log(GeV)", "log(GeV)", "1", "1", "1"],
                description="ParticleNet per-particle features",
            ),
        ),
    ],
    metadata=_meta(
        name="jet_constituents",
        row="jet",
        description="particles of one jet, ParticleNet inputs, ragged",
    ),
)
"""One row per jet: ``points`` (2 coordinates) and ``features`` (:data:`CONSTITUENT_FEATURES`)
per particle, both ``list<fixed_size_list<float32, n>>`` with equal lengths."""

#: (channels, eta pixels, phi pixels) of a jet image.
JET_IMAGE_SHAPE: tuple[int, int, int] = (1, 37, 37)

JET_IMAGES: pa.Schema = pa.schema(
    [
        pa.field(
            "image",
            pa.fixed_shape_tensor(pa.float32(), list(JET_IMAGE_SHAPE)),
            nullable=False,
            metadata=_meta(
                unit="GeV",
                axes=["channel", "eta", "phi"],
                pixel_size=[0.8 / 18, 0.8 / 18],
                description="transverse momentum per calorimeter pixel, jet axis at the centre",
            ),
        ),
    ],
    metadata=_meta(
        name="jet_images",
        row="jet",
        description="calorimeter jet image for a top-tagging CNN",
    ),
)
"""One row per jet: ``image`` is ``arrow.fixed_shape_tensor(float32, [1, 37, 37])``."""

SCHEMAS: dict[str, pa.Schema] = {
    "nanoaod_jets": NANOAOD_JETS,
    "hcal_hits": HCAL_HITS,
    "jet_constituents": JET_CONSTITUENTS,
    "jet_images": JET_IMAGES,
}
"""The example schemas by name."""


# --------------------------------------------------------------------------------------------
# Synthetic events
# --------------------------------------------------------------------------------------------


def _check_count(n: int, what: str) -> int:
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"{what} must be >= 0, got {n}")
    return n


def _offsets(counts: np.ndarray) -> np.ndarray:
    """Offsets (int32, ``len(counts) + 1``) of a list array with these multiplicities."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        # list<...> has 32-bit offsets; say so rather than wrap around.
        raise ValueError(
            f"{offsets[-1]} list entries do not fit 32-bit offsets; generate fewer rows per batch"
        )
    return offsets.astype(np.int32)


def _list_array(offsets: np.ndarray, values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """A list array of float32 scalars (1-d ``values``) or vectors (2-d ``values``)."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    value_type = type_.value_type
    if pa.types.is_fixed_size_list(value_type):
        items: pa.Array = pa.FixedSizeListArray.from_arrays(flat, type=value_type)
    else:
        items = flat
    return pa.ListArray.from_arrays(pa.array(offsets), items, type=type_)


def _owner(counts: np.ndarray) -> np.ndarray:
    """Row index of every flat entry, for per-row broadcasts and reductions."""
    return np.repeat(np.arange(len(counts)), counts)


def synthetic_jets(n_events: int, *, seed: int = 0) -> pa.RecordBatch:
    """Make NanoAOD-like events with jets.

    Parameters
    ----------
    n_events : int
        Number of events (rows), ``>= 0``.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal batches.

    Returns
    -------
    pyarrow.RecordBatch
        Schema :data:`NANOAOD_JETS`. Jets per event are Poisson (mean 5); ``Jet_pt`` is
        20 GeV plus an exponential (mean 30 GeV), descending within an event; ``Jet_eta``
        Gaussian clipped to ``|eta| < 2.5``; ``Jet_phi`` uniform in ``[-pi, pi)``;
        ``Jet_mass`` 5-20 % of ``Jet_pt``; ``Jet_btagDeepB`` Beta-distributed in ``[0, 1]``.
    """
    n_events = _check_count(n_events, "n_events")
    rng = np.random.default_rng(seed)
    counts = rng.poisson(5.0, n_events)
    offsets = _offsets(counts)
    total = int(offsets[-1])
    owner = _owner(counts)

    pt = 20.0 + rng.exponential(30.0, total)
    # NanoAOD orders jets by descending pt; lexsort keeps events contiguous (owner is sorted).
    pt = pt[np.lexsort((-pt, owner))]
    eta = np.clip(rng.normal(0.0, 1.3, total), -2.499, 2.499)
    phi = rng.uniform(-np.pi, np.pi, total)
    mass = pt * rng.uniform(0.05, 0.2, total)
    btag = rng.beta(0.6, 3.0, total)

    index = np.arange(n_events, dtype=np.uint64)
    jet_list = NANOAOD_JETS.field("Jet_pt").type
    columns = [
        pa.array(np.ones(n_events, dtype=np.uint32)),
        pa.array((1 + index // 1000).astype(np.uint32)),
        pa.array(1 + index),
        pa.array(counts.astype(np.uint32)),
        *(_list_array(offsets, v, jet_list) for v in (pt, eta, phi, mass, btag)),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=NANOAOD_JETS)


# HCAL Phase-1 digis have 8 time samples with the signal in sample 3 ("sample of interest").
_PULSE_SHAPE = np.array([0.0, 0.01, 0.12, 0.62, 0.2, 0.04, 0.01, 0.0])
_PULSE_SHAPE = _PULSE_SHAPE / _PULSE_SHAPE.sum()


def synthetic_hcal_hits(n_events: int, *, seed: int = 0, mean_hits: int = 2000) -> pa.RecordBatch:
    """Make events of HCAL hits with FACILE-like features.

    Parameters
    ----------
    n_events : int
        Number of events (rows), ``>= 0``.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal batches.
    mean_hits : int, default 2000
        Mean number of hits per event; the multiplicity is Gaussian around it (10 % width),
        never negative.

    Returns
    -------
    pyarrow.RecordBatch
        Schema :data:`HCAL_HITS`; the 15 features of every hit are, in order,
        :data:`HCAL_HIT_FEATURES`. The deposited charge is exponential, spread over the 8 time
        samples with a pulse shape peaking in sample 3, on top of a pedestal; ``ieta`` is in
        ``[-29, 29]`` without 0, ``iphi`` in ``[1, 72]``, ``depth`` in ``[1, 7]``.
    """
    n_events = _check_count(n_events, "n_events")
    mean_hits = _check_count(mean_hits, "mean_hits")
    rng = np.random.default_rng(seed)
    counts = np.maximum(np.rint(rng.normal(mean_hits, 0.1 * mean_hits, n_events)), 0)
    counts = counts.astype(np.int64)
    offsets = _offsets(counts)
    total = int(offsets[-1])

    # Thousands of hits per event make this the largest generator: fill one float32 block
    # in place rather than stacking float64 columns.
    f32 = np.float32
    hits = np.empty((total, len(HCAL_HIT_FEATURES)), dtype=f32)
    charges, pedestal, gain = hits[:, :8], hits[:, 8], hits[:, 9]
    pedestal[:] = 3.0 + 0.3 * rng.standard_normal(total, dtype=f32)  # fC per time sample
    signal = 200.0 * rng.standard_exponential(total, dtype=f32)  # fC
    charges[:] = rng.standard_normal((total, 8), dtype=f32)  # electronic noise
    charges += signal[:, None] * _PULSE_SHAPE.astype(f32) + pedestal[:, None]
    np.maximum(charges, 0.0, out=charges)  # QIE charges are never negative
    gain[:] = 0.0035 + 0.0003 * rng.standard_normal(total, dtype=f32)  # GeV/fC
    hits[:, 10] = (charges[:, 3] + charges[:, 4] - 2 * pedestal) * gain  # "method 0" energy
    hits[:, 11] = 3.0 * rng.standard_normal(total, dtype=f32)  # ns
    hits[:, 12] = rng.integers(1, 30, total) * (2 * rng.integers(0, 2, total) - 1)  # no ieta 0
    hits[:, 13] = rng.integers(1, 73, total)
    hits[:, 14] = rng.integers(1, 8, total)

    column = _list_array(offsets, hits, HCAL_HITS.field("hits").type)
    return pa.RecordBatch.from_arrays([column], schema=HCAL_HITS)


def synthetic_jet_constituents(
    n_jets: int, *, seed: int = 0, mean_constituents: int = 40
) -> pa.RecordBatch:
    """Make jets of particles as ParticleNet inputs.

    Parameters
    ----------
    n_jets : int
        Number of jets (rows), ``>= 0``.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal batches.
    mean_constituents : int, default 40
        Mean of the Poisson number of particles per jet. Jets without particles are
        possible but rare (probability ``exp(-mean_constituents)``).

    Returns
    -------
    pyarrow.RecordBatch
        Schema :data:`JET_CONSTITUENTS`. Jets have pt 550-650 GeV and ``|eta| < 2`` (as in
        the top-tagging reference data set); particles share the jet's pt by exponential
        fractions and lie within ``R = 0.8`` of its axis. All values are finite.
    """
    n_jets = _check_count(n_jets, "n_jets")
    mean_constituents = _check_count(mean_constituents, "mean_constituents")
    rng = np.random.default_rng(seed)
    counts = rng.poisson(mean_constituents, n_jets)
    offsets = _offsets(counts)
    total = int(offsets[-1])
    owner = _owner(counts)

    jet_pt = rng.uniform(550.0, 650.0, n_jets)
    jet_eta = rng.uniform(-2.0, 2.0, n_jets)
    # Exponential weights normalised per jet are a Dirichlet draw: fractions summing to 1.
    weight = rng.exponential(1.0, total) + 1e-6
    fraction = weight / np.bincount(owner, weights=weight, minlength=n_jets)[owner]
    pt = fraction * jet_pt[owner]
    # Particles crowd the jet axis; Beta(1, 4) puts the mean distance at 0.16 of R = 0.8.
    radius = 0.8 * rng.beta(1.0, 4.0, total)
    angle = rng.uniform(-np.pi, np.pi, total)
    delta_eta = radius * np.cos(angle)
    delta_phi = radius * np.sin(angle)
    energy = pt * np.cosh(jet_eta[owner] + delta_eta)
    jet_energy = np.bincount(owner, weights=energy, minlength=n_jets)

    points = np.column_stack([delta_eta, delta_phi])
    features = np.column_stack(
        [
            delta_eta,
            delta_phi,
            np.log(pt),
            np.log(energy),
            np.log(fraction),
            np.log(energy / jet_energy[owner]),
            np.hypot(delta_eta, delta_phi),
        ]
    )
    columns = [
        _list_array(offsets, points, JET_CONSTITUENTS.field("points").type),
        _list_array(offsets, features, JET_CONSTITUENTS.field("features").type),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=JET_CONSTITUENTS)


def synthetic_jet_images(n_jets: int, *, seed: int = 0) -> pa.RecordBatch:
    """Make calorimeter jet images.

    Parameters
    ----------
    n_jets : int
        Number of jets (rows), ``>= 0``.
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`; equal seeds give equal batches.

    Returns
    -------
    pyarrow.RecordBatch
        Schema :data:`JET_IMAGES`. Each image holds one to three Gaussian "prongs" (QCD-like
        jets have one, top-like jets three) around the centre, the leading one at the
        centre, with pixel values in GeV summing to about the jet pt (550-650 GeV).
    """
    n_jets = _check_count(n_jets, "n_jets")
    rng = np.random.default_rng(seed)
    _, n_eta, n_phi = JET_IMAGE_SHAPE
    eta = np.arange(n_eta, dtype=np.float32) - (n_eta - 1) / 2
    phi = np.arange(n_phi, dtype=np.float32) - (n_phi - 1) / 2

    n_prongs = 3
    jet_pt = rng.uniform(550.0, 650.0, n_jets)
    # Prongs beyond the jet's number have zero weight; the leading prong sits at the centre.
    active = np.arange(n_prongs) < rng.integers(1, n_prongs + 1, n_jets)[:, None]
    weight = rng.exponential(1.0, (n_jets, n_prongs)) * active
    weight[:, 0] += 1.0
    weight /= weight.sum(axis=1, keepdims=True)
    centre = rng.normal(0.0, 6.0, (n_jets, n_prongs, 2))
    centre[:, 0] = 0.0
    width = rng.uniform(1.0, 2.5, (n_jets, n_prongs))

    images = np.zeros((n_jets, n_eta, n_phi), dtype=np.float32)
    for k in range(n_prongs):  # a loop over prongs, vectorised over jets and pixels
        d_eta = eta[None, :, None] - centre[:, k, 0, None, None]
        d_phi = phi[None, None, :] - centre[:, k, 1, None, None]
        s = width[:, k, None, None]
        blob = np.exp(-(d_eta**2 + d_phi**2) / (2 * s**2)) / (2 * np.pi * s**2)
        images += (jet_pt * weight[:, k])[:, None, None] * blob
    tensors = images.reshape(n_jets, *JET_IMAGE_SHAPE)

    tensor_type = JET_IMAGES.field("image").type
    if n_jets:
        column: pa.Array = pa.FixedShapeTensorArray.from_numpy_ndarray(tensors)
    else:
        # from_numpy_ndarray refuses empty arrays; an empty storage array is the same thing.
        storage = pa.FixedSizeListArray.from_arrays(
            pa.array(images.reshape(-1)), int(np.prod(JET_IMAGE_SHAPE))
        )
        column = pa.ExtensionArray.from_storage(tensor_type, storage)
    return pa.RecordBatch.from_arrays([column], schema=JET_IMAGES)


_GENERATORS: dict[str, Callable[..., pa.RecordBatch]] = {
    "nanoaod_jets": synthetic_jets,
    "hcal_hits": synthetic_hcal_hits,
    "jet_constituents": synthetic_jet_constituents,
    "jet_images": synthetic_jet_images,
}


def synthetic(name: str, n: int, *, seed: int = 0) -> pa.RecordBatch:
    """Make ``n`` rows of synthetic data for the schema ``SCHEMAS[name]``.

    Parameters
    ----------
    name : str
        A key of :data:`SCHEMAS`: ``"nanoaod_jets"``, ``"hcal_hits"``,
        ``"jet_constituents"`` or ``"jet_images"``.
    n : int
        Number of rows (events or jets, as the schema's ``row`` metadata says).
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng`.

    Returns
    -------
    pyarrow.RecordBatch
        A batch with schema ``SCHEMAS[name]``, from the matching ``synthetic_*`` function
        with its default multiplicities.

    Raises
    ------
    ValueError
        If ``name`` is not a known schema.
    """
    try:
        generator = _GENERATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown event schema {name!r}; expected one of {', '.join(_GENERATORS)}"
        ) from None
    return generator(n, seed=seed)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _import_optional(module: str) -> ModuleType:
    """Import ``uproot`` or ``awkward``, or say how to install them."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"reading ROOT files needs {module}; install it with:\n\n"
            "    pip install 'arrowinfer[awkward]'\n"
        ) from err


def shared_data_dir() -> Path | None:
    """Find the directory of example ROOT files, if there is one.

    Returns
    -------
    pathlib.Path or None
        ``$ARROWINFER_DATA`` when that variable is set, otherwise ``../shared/data`` next to
        the repository (the directory above the one holding the ``arrowinfer`` package);
        ``None`` when the chosen directory does not exist.
    """
    env = os.environ.get("ARROWINFER_DATA")
    if env:
        candidate = Path(env)
    else:
        repository = Path(__file__).resolve().parent.parent
        candidate = repository.parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def _tree_to_arrow(tree: Any, arrays_kwargs: dict[str, Any]) -> pa.Table:
    """Read a TTree with uproot and convert it to a plain Arrow table."""
    ak = _import_optional("awkward")
    array = tree.arrays(library="ak", **arrays_kwargs)
    table = ak.to_arrow_table(
        array,
        extensionarray=False,
        list_to32=True,
        string_to32=True,
        bytestring_to32=True,
    )
    # awkward's schema metadata ("ak:parameters") only matters for the way back to awkward.
    return table.replace_schema_metadata(None)


def read_events(
    path: str | os.PathLike[str],
    tree: str,
    *,
    filter_name: str | Sequence[str] | None = None,
    entry_stop: int | None = None,
) -> pa.Table:
    """Read a ROOT TTree into an Arrow table with uproot and awkward.

    Parameters
    ----------
    path : str or path-like
        The ROOT file.
    tree : str
        Name of the TTree in the file, e.g. ``"Events"`` or ``"events"``.
    filter_name : str or sequence of str, optional
        Branch names or glob patterns to read (uproot's ``filter_name``); all branches
        when omitted. Names that match nothing are skipped silently, as in uproot.
    entry_stop : int, optional
        Read the first ``entry_stop`` entries only.

    Returns
    -------
    pyarrow.Table
        One row per entry. Jagged branches are ``list<item: T not null>`` with 32-bit
        offsets, flat branches primitive columns, all non-nullable; no awkward extension
        types and no schema metadata. The data are copied out of awkward's buffers only
        where Arrow needs another layout.

    Raises
    ------
    ModuleNotFoundError
        If uproot or awkward is not installed.
    """
    uproot = _import_optional("uproot")
    _import_optional("awkward")
    kwargs: dict[str, Any] = {"entry_stop": entry_stop}
    if filter_name is not None:
        kwargs["filter_name"] = filter_name if isinstance(filter_name, str) else list(filter_name)
    with uproot.open(path) as file:
        return _tree_to_arrow(file[tree], kwargs)


_NANOAOD_BRANCHES: tuple[str, ...] = tuple(NANOAOD_JETS.names)


def read_nanoaod(
    path: str | os.PathLike[str],
    *,
    branches: Sequence[str] = _NANOAOD_BRANCHES,
    entry_stop: int | None = None,
) -> pa.Table:
    """Read NanoAOD jets from the ``Events`` tree of a ROOT file.

    Parameters
    ----------
    path : str or path-like
        A NanoAOD file.
    branches : sequence of str, default all columns of :data:`NANOAOD_JETS`
        Branch names, read in this order. Unknown names raise uproot's
        ``KeyInFileError``, which lists the closest branch names.
    entry_stop : int, optional
        Read the first ``entry_stop`` events only.

    Returns
    -------
    pyarrow.Table
        One row per event, columns in the order of ``branches``. Columns that
        :data:`NANOAOD_JETS` knows have its field (type, nullability and metadata); with the
        default ``branches`` the schema equals :data:`NANOAOD_JETS`, metadata included.
        Other branches keep the type awkward gives them.

    Raises
    ------
    ModuleNotFoundError
        If uproot or awkward is not installed.
    pyarrow.ArrowInvalid
        If a branch cannot be cast to the type of :data:`NANOAOD_JETS` (a file from a
        NanoAOD version with other types).

    Notes
    -----
    NanoAOD's types come through unchanged: jagged ``Float_t`` branches are
    ``list<item: float not null>``, counters such as ``nJet`` and ``run`` and
    ``luminosityBlock`` are ``uint32``, ``event`` is ``uint64``. The cast to the schema
    therefore only attaches field metadata; it converts values only for files whose
    types differ.
    """
    uproot = _import_optional("uproot")
    _import_optional("awkward")
    names = list(branches)
    with uproot.open(path) as file:
        # Expressions, unlike filter_name, fail on a missing branch instead of skipping it.
        table = _tree_to_arrow(file["Events"], {"expressions": names, "entry_stop": entry_stop})
    table = table.select(names)
    known = set(NANOAOD_JETS.names)
    fields = [NANOAOD_JETS.field(f.name) if f.name in known else f for f in table.schema]
    metadata = NANOAOD_JETS.metadata if names == list(NANOAOD_JETS.names) else None
    return table.cast(pa.schema(fields, metadata=metadata))


def write_schemas(directory: str | os.PathLike[str]) -> list[Path]:
    """Write every schema of :data:`SCHEMAS` as an Arrow IPC schema message.

    Parameters
    ----------
    directory : str or path-like
        Where to write ``<name>.schema.arrow`` for each name; created if missing.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order of :data:`SCHEMAS`.

    Notes
    -----
    Each file is one encapsulated IPC ``Schema`` message (:meth:`pyarrow.Schema.serialize`),
    not a stream or a file with record batches. Read it back with
    ``pa.ipc.read_schema(pa.OSFile(path))``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in SCHEMAS.items():
        path = directory / f"{name}.schema.arrow"
        with pa.OSFile(str(path), "wb") as sink:
            sink.write(schema.serialize())
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m arrowinfer.events``.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments without the program name; ``sys.argv[1:]`` when omitted.

    Returns
    -------
    int
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="python -m arrowinfer.events", description="Example event schemas."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-schemas", help="write schemas/<name>.schema.arrow files")
    write.add_argument("directory", type=Path, help="output directory (created if missing)")
    args = parser.parse_args(argv)
    if args.command == "write-schemas":
        for path in write_schemas(args.directory):
            sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
