"""The explicit-output channel of hook points: `HookIO` and the patch / intervention rules it applies.

A `HookIO` is passed down the forward as an argument; every `HookPoint` it reaches hands it the activation.
It records the names it was built to capture and applies patches and intervention modules to others. Its name
sets are fixed Python constants, so `torch.compile(fullgraph=True)` and `torch.export` see plain tensor code
(see capture.py). The same patch and intervention rules serve eager Python hooks (`intervention_hook`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

HookFn = Callable[..., Any]  # fn(tensor, hook=HookPoint) -> Tensor | None
NameFilter = Union[str, Callable[[str], bool], Sequence[str], None]
Direction = Literal["fwd", "bwd"]
PATCH_MODES = ("replace", "add")


def is_tracing() -> bool:
    """True under torch.compile, torch.export or torch.jit.trace: no data-dependent checks then."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class HookIO:
    """Explicit-output channel for hook points: records some activations, patches others.

    `capture` and `patch_modes` are fixed when it is built (constants to Dynamo); `patches`
    holds the tensors. `outputs` fills in forward order as hook points are visited.
    """

    def __init__(
        self,
        capture: Iterable[str] = (),
        patch_modes: Mapping[str, str] | None = None,
        patches: Mapping[str, Tensor] | None = None,
        interventions: Mapping[str, nn.Module] | None = None,
    ) -> None:
        self.capture = frozenset(capture)
        self.patch_modes = dict(patch_modes or {})
        self.patches = dict(patches or {})
        self.interventions = dict(interventions or {})
        self.outputs: dict[str, Tensor] = {}
        self.regional = True  # under torch.compile each layer is one reused compile region (regions.py)

    def key(self, point: Any) -> str:
        """The name this IO knows a `HookPoint` by: its full name (a layer's region IO uses `local_name`)."""
        return point.name

    def touches(self, name: str) -> bool:
        """True if this name is captured, patched or intervened on (so it must be computed explicitly)."""
        return name in self.capture or name in self.patch_modes or name in self.interventions

    def visit(self, name: str, x: Tensor) -> Tensor:
        """Patch, then intervene (side outputs recorded as `"<name>.<output>"`), then capture."""
        mode = self.patch_modes.get(name)
        if mode is not None:
            x = apply_patch(name, x, self.patches[name], mode)
        module = self.interventions.get(name)
        if module is not None:
            x, side = apply_intervention(name, module, x)
            for key, value in side.items():
                self.outputs[f"{name}.{key}"] = value
        if name in self.capture:
            self.outputs[name] = x
        return x


def apply_patch(name: str, x: Tensor, patch: Tensor, mode: str) -> Tensor:
    """`replace`: the patch (same shape) stands in for `x`; `add`: broadcast-add it (a steering vector)."""
    patch = patch.to(dtype=x.dtype, device=x.device)
    if not is_tracing():
        if mode == "replace" and patch.shape != x.shape:
            raise ValueError(f"patch for {name!r} has shape {tuple(patch.shape)}; 'replace' needs {tuple(x.shape)}")
        if mode == "add":
            try:
                ok = torch.broadcast_shapes(patch.shape, x.shape) == x.shape
            except RuntimeError:
                ok = False
            if not ok:
                raise ValueError(
                    f"patch for {name!r} has shape {tuple(patch.shape)}; 'add' needs a shape that broadcasts "
                    f"to {tuple(x.shape)}"
                )
    return patch if mode == "replace" else x + patch


def apply_intervention(name: str, module: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run an intervention module on the activation at `name`.

    Protocol: `module(x)` returns the replacement (same shape as `x`), or `(replacement, {output: tensor})`
    whose named side outputs (SAE features, probe logits) the caller exposes as `"<name>.<output>"`.
    """
    result = module(x)
    side: dict[str, Tensor] = {}
    if isinstance(result, tuple):
        if len(result) != 2 or not isinstance(result[1], Mapping):
            raise TypeError(
                f"intervention at {name!r} returned a tuple of {len(result)}; return a Tensor or (Tensor, dict)"
            )
        result, side = result[0], dict(result[1])
    if not isinstance(result, Tensor):
        raise TypeError(f"intervention at {name!r} returned {type(result).__name__}; return a Tensor or (Tensor, dict)")
    if not is_tracing():
        if result.shape != x.shape:
            raise ValueError(
                f"intervention at {name!r} returned shape {tuple(result.shape)}; it must keep the activation's "
                f"shape {tuple(x.shape)}"
            )
        for key, value in side.items():
            if not isinstance(key, str) or not key or not isinstance(value, Tensor):
                raise TypeError(f"intervention at {name!r}: side outputs must map non-empty str names to Tensors")
    return result, side


def intervention_hook(name: NameFilter, module: nn.Module) -> tuple[NameFilter, HookFn]:
    """A `(name, fn)` forward hook that splices `module` in eagerly; side outputs go to `hook.ctx`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"interventions[{name!r}] must be an nn.Module, got {type(module).__name__}")

    def splice(x: Tensor, hook: Any) -> Tensor:  # hook: the HookPoint
        out, side = apply_intervention(hook.name, module, x)
        hook.ctx.update(side)
        return out

    return name, splice
