"""KServe's protobuf parameters for tests that write gRPC requests by hand."""

from __future__ import annotations

from typing import Any


def set_parameter(target: Any, value: Any) -> None:
    """``value`` into a protobuf ``InferParameter`` as tritonclient.grpc sets one: an int
    beyond int64 as uint64, any other int as int64 (any kind, so that tests can send the
    wrong one)."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int) and value >= 2**63:
        target.uint64_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = value
