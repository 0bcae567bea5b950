"""Inference inside a coffea processor, as ``coffea.ml_tools.triton_wrapper`` does it.

>>> class JetScore(InferenceWrapper):
...     def prepare_awkward(self, jets):
...         features = [jets[b][..., None] for b in ("pt", "eta", "phi", "mass", ...)]
...         return {"jet": ak.values_astype(ak.concatenate(features, axis=-1), "float32")}
>>> score = JetScore("jet_score", servers="grpc://gpu1:8815,grpc://gpu2:8815")
>>> class Processor(coffea.processor.ProcessorABC):
...     def process(self, events):
...         return {"score": score(events.Jet).score}   # one score per jet

Differences from ``triton_wrapper``, on purpose:

- **Ragged without padding.** ``prepare_awkward`` returns awkward arrays at any nesting
  (per event, per jet, per jet's constituents); :func:`arrowinfer.awkward.infer` sends only
  the real entries as Arrow lists and gives the results back with the inputs' structure.
- **Resilience.** Several servers (``servers``: list, comma-separated, ``@FILE`` or
  ``$ARROWINFER_SERVERS``), failover (``retries``, ``attempt_timeout``) and
  ``fallback="local"`` with a ``repository`` (the model runs in the worker process).

The wrapper holds options only, never a connection: it pickles to Dask, futures or
TaskVine workers as it is, and each worker process makes one client on first use and keeps
it for every chunk it runs (the cache of :mod:`arrowinfer.dask`). Called on eager or
virtual NanoEvents it returns awkward arrays; on ``mode="dask"`` NanoEvents, dask-awkward
arrays computed partition by partition.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from .awkward import infer

__all__ = ["InferenceWrapper"]


class InferenceWrapper:
    """A model on arrowinfer servers, callable on (dask-)awkward arrays.

    Parameters
    ----------
    model
        Model name (``"name/version"`` also works).
    servers
        Server URL(s) as for :class:`~arrowinfer.client.Client` (None: ``$ARROWINFER_SERVERS``
        on each worker).
    fallback, repository, retries, attempt_timeout, timeout
        The client's resilience options.
    batch_rows
        Entries per request.
    **client_options
        More ``Client`` options (``token``, ``compression``, ``shm``, ...); they must pickle.

    Subclasses override :meth:`prepare_awkward` (and, if they like,
    :meth:`postprocess_awkward`); called as ``wrapper(*args, **kwargs)``.
    """

    def __init__(
        self,
        model: str,
        servers: str | Sequence[str] | None = None,
        *,
        fallback: str = "error",
        repository: str | os.PathLike[str] | None = None,
        retries: int = 2,
        attempt_timeout: float | None = None,
        timeout: float | None = 60.0,
        batch_rows: int = 65536,
        **client_options: Any,
    ):
        if fallback not in ("error", "local"):
            raise ValueError(f"fallback must be 'error' or 'local', got {fallback!r}")
        if fallback == "local" and repository is None:
            raise ValueError("fallback='local' needs repository=<model repository directory>")
        self.model = model
        self.batch_rows = batch_rows
        self.servers = servers if servers is None or isinstance(servers, str) else list(servers)
        # Plain values only, so the wrapper pickles and every worker builds the same client.
        self.client_options: dict[str, Any] = {
            "fallback": fallback,
            "repository": None if repository is None else os.fspath(repository),
            "retries": retries,
            "attempt_timeout": attempt_timeout,
            "timeout": timeout,
            **client_options,
        }

    def prepare_awkward(self, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
        """The model's inputs from the call's arguments: ``{input name: (dask-)awkward array}``.

        The default takes one mapping (or record array) whose fields are the inputs.
        """
        if len(args) == 1 and not kwargs:
            data = args[0]
            fields = getattr(data, "fields", None)
            if isinstance(data, Mapping):
                return data
            if fields:
                return {name: data[name] for name in fields}
        raise NotImplementedError(
            f"{type(self).__name__}.prepare_awkward: override it to build the inputs of "
            f"model {self.model!r} from the call's arguments"
        )

    def postprocess_awkward(self, result: Any, *args: Any, **kwargs: Any) -> Any:
        """The value returned to the caller (default: the outputs as they come)."""
        return result

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; records with a field per output, in the inputs' structure.

        On dask-awkward arguments the whole call (``prepare_awkward`` included, which may
        use what dask-awkward cannot do lazily) runs partition by partition.
        """
        if any(type(a).__module__.startswith("dask_awkward") for a in args):
            import dask_awkward as dak

            return dak.map_partitions(self._call, *args, **kwargs, label=f"arrowinfer-{self.model}")
        return self._call(*args, **kwargs)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        inputs = self.prepare_awkward(*args, **kwargs)
        url = self.servers if self.servers is not None else os.environ.get("ARROWINFER_SERVERS")
        if url is None and self.client_options["fallback"] == "local":
            url = "local"
        result = infer(
            url or [], self.model, inputs, batch_rows=self.batch_rows, **self.client_options
        )
        return self.postprocess_awkward(result, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r}, servers={self.servers!r})"
