"""The NanoAOD analysis models over the CMS open-data sample, through every transport.

Runs the two example models that read real NanoAOD branches over
``nanoAOD_2015_CMS_Open_Data_ttbar.root`` (found with :func:`arrowinfer.events.shared_data_dir`):

- ``jet_score``, a per-jet tagger: one request row per jet (``Jet_pt``, ``Jet_eta``, ...,
  ``Jet_nConstituents``), one score per jet back, as ``events.Jet``'s structure;
- ``event_jets``, a Deep Sets event classifier over each event's ragged jets (only the real
  jets travel; the server pads and masks).

through each transport: in-process (``local``), Arrow Flight over TCP and over a Unix socket,
shared memory, and the same server's KServe v2 gRPC endpoint with ``tritonclient`` (per-jet
model only: KServe has no ragged tensors). It checks that every transport gives the same
scores, and writes a PNG with the score distributions and the events/s of each transport.

**Random weights**: the scores mean nothing physics-wise; shapes, inputs and data flow are real.

Usage::

    python clients/nanoaod_transports.py                 # writes docs/nanoaod_transports.png
    python clients/nanoaod_transports.py --repeat 50 --out scores.png
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone

from arrowinfer import events
from arrowinfer.awkward import infer
from arrowinfer.client import Client
from arrowinfer.examples import (
    ALL_MODELS,
    EVENT_JETS_BRANCHES,
    JET_SCORE_BRANCHES,
    write_example_repository,
)
from arrowinfer.server import Server

SAMPLE = "nanoAOD_2015_CMS_Open_Data_ttbar.root"


def features(path: Path) -> tuple[Any, Any]:
    """Per-jet feature vectors (events * var * 8) and per-event jet sets (events * var * 5)."""
    import awkward as ak
    import uproot

    with uproot.open(path) as file:
        jets = file["Events"].arrays(list(JET_SCORE_BRANCHES), library="ak")

    def stack(branches: tuple[str, ...]) -> Any:
        columns = [ak.values_astype(jets[b], np.float32)[..., np.newaxis] for b in branches]
        return ak.concatenate(columns, axis=-1)

    return stack(JET_SCORE_BRANCHES), stack(EVENT_JETS_BRANCHES)


def kserve_jet_score(url: str) -> Callable[[Any], np.ndarray]:
    """jet_score over the KServe v2 gRPC endpoint with tritonclient: flat [n_jets, 8] in."""
    import awkward as ak
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def run(per_jet: Any) -> np.ndarray:
        flat = ak.to_numpy(ak.flatten(per_jet))
        request = grpcclient.InferInput("jet", list(flat.shape), "FP32")
        request.set_data_from_numpy(flat)
        result = client.infer("jet_score", [request])
        return ak.unflatten(result.as_numpy("score").ravel(), ak.num(per_jet))

    return run


def timed(call: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """The last result and the seconds per call (best of ``repeat`` after one warm-up)."""
    result = call()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return result, best


def plot(
    scores: dict[str, Any],
    probabilities: dict[str, Any],
    rates: dict[str, dict[str, float]],
    n_events: int,
    out: Path,
) -> None:
    import awkward as ak
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    bins = np.linspace(0, 1, 26)
    for name, values in scores.items():
        left.hist(ak.to_numpy(ak.flatten(values)), bins=bins, histtype="step", label=name)
    left.set(xlabel="jet_score (one per jet)", ylabel="jets", title="Per-jet tagger")
    left.legend(fontsize=7)
    for name, values in probabilities.items():
        middle.hist(ak.to_numpy(values)[:, 1], bins=bins, histtype="step", label=name)
    middle.set(
        xlabel="event_jets P(signal)", ylabel="events", title="Deep Sets over each event's jets"
    )
    middle.legend(fontsize=7)
    names = list(rates)
    x = np.arange(len(names))
    for i, model in enumerate(("jet_score", "event_jets")):
        values = [rates[n].get(model, 0.0) for n in names]
        right.bar(x + (i - 0.5) * 0.4, values, width=0.4, label=model)
    right.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    right.set(ylabel="events/s", title=f"{n_events} events per call, best of repeats")
    right.legend(fontsize=7)
    fig.suptitle(f"CMS open data {SAMPLE} (random-weight example models)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, help=f"NanoAOD file (default: the shared {SAMPLE})")
    parser.add_argument("--repeat", type=int, default=10, help="timed passes per transport")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "docs" / "nanoaod_transports.png",
        help="the PNG to write (default: docs/nanoaod_transports.png)",
    )
    args = parser.parse_args(argv)
    path = args.file
    if path is None:
        data = events.shared_data_dir()
        if data is None or not (data / SAMPLE).exists():
            parser.error(f"no {SAMPLE} (set $ARROWINFER_DATA, or give --file)")
        path = data / SAMPLE
    per_jet, per_event = features(path)
    n_events = len(per_jet)

    import awkward as ak

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        repository = write_example_repository(tmp / "models", models=ALL_MODELS)
        models = ["jet_score", "event_jets"]
        tcp = stack.enter_context(
            Server(repository, port=0, kserve_port=0, metrics_port=None, models=models)
        )
        unix = stack.enter_context(
            Server(repository, unix_socket=str(tmp / "flight.sock"), kserve_port=None,
                   metrics_port=None, models=models)
        )  # fmt: skip
        port = tcp.location.rsplit(":", 1)[1]
        urls = {
            "in-process": "local",
            "flight-tcp": tcp.location,
            "flight-unix": unix.location,
            "shm": f"shm://127.0.0.1:{port}",
        }
        scores: dict[str, Any] = {}
        probabilities: dict[str, Any] = {}
        rates: dict[str, dict[str, float]] = {}
        for name, url in urls.items():
            options = {"fallback": "local", "repository": repository} if url == "local" else {}
            client = stack.enter_context(Client(url, **options))
            out, seconds = timed(partial(infer, client, "jet_score", {"jet": per_jet}), args.repeat)
            scores[name] = out.score
            rates[name] = {"jet_score": n_events / seconds}
            out, seconds = timed(
                partial(infer, client, "event_jets", {"jets": per_event}), args.repeat
            )
            probabilities[name] = out.probabilities
            rates[name]["event_jets"] = n_events / seconds
        kserve = kserve_jet_score(f"127.0.0.1:{tcp.kserve_port}")
        scores["kserve-grpc"], seconds = timed(partial(kserve, per_jet), args.repeat)
        rates["kserve-grpc"] = {"jet_score": n_events / seconds}

    reference = ak.to_numpy(ak.flatten(scores["flight-tcp"]))
    for name, values in scores.items():  # the same bits through every transport
        np.testing.assert_array_equal(ak.to_numpy(ak.flatten(values)), reference, err_msg=name)
    for name, values in probabilities.items():
        np.testing.assert_array_equal(
            ak.to_numpy(values), ak.to_numpy(probabilities["flight-tcp"]), err_msg=name
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(scores, probabilities, rates, n_events, args.out)
    for name, rate in rates.items():
        line = ", ".join(f"{m} {r:,.0f} events/s" for m, r in rate.items())
        sys.stdout.write(f"{name:12s} {line}\n")
    sys.stdout.write(f"same scores through every transport; wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
