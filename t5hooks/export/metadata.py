"""The t5hooks metadata of an ONNX graph: JSON values under keys `t5hooks.<key>` in its metadata_props."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

METADATA_PREFIX = "t5hooks."


def read_metadata(props: Mapping[str, str]) -> dict[str, Any]:
    """The t5hooks entries of a graph's metadata (keys without the prefix); other metadata is ignored."""
    return {k[len(METADATA_PREFIX) :]: json.loads(v) for k, v in props.items() if k.startswith(METADATA_PREFIX)}
