"""Hook points: named identity modules on every interesting activation, TransformerLens style.

Two ways to reach an activation, one forward:

* Python hooks (`add_hook`, `hooks()`, `run_with_hooks`, `run_with_cache`): functions
  `fn(tensor, hook) -> tensor | None` registered on a `HookPoint`, run eagerly.
* A `HookIO` passed down the forward as an argument: it records the named activations it was
  built for and applies patches to them. Its name sets are fixed Python constants, so
  `torch.compile(fullgraph=True)` and `torch.export` see plain tensor code (see capture.py).

Every `HookPoint` declares the axes of its activation (`HookPoint(("batch", "pos", "d_model"))`); its
name, stack and key stack come from where it sits in the module tree. `HookLayout` collects these
declarations: export axes, the ONNX generator's encoder/decoder split, `act_name`, unknown-name
hints and the README hook table all read it, so a new hook point is one line in one module.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

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
        self.regional = True  # under torch.compile, each layer is a nested compile region (see regions.py)

    def key(self, point: HookPoint) -> str:
        """The name this IO knows `point` by (the full hook name)."""
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

    def splice(x: Tensor, hook: HookPoint) -> Tensor:
        out, side = apply_intervention(hook.name, module, x)
        hook.ctx.update(side)
        return out

    return name, splice


@dataclass(eq=False)
class LensHandle:
    """A registered Python hook: the torch handle plus TransformerLens bookkeeping."""

    hook: RemovableHandle
    is_permanent: bool = False
    context_level: int | None = None


class HookPoint(nn.Module):
    """Identity module marking an activation. Hooks see (and may replace) the tensor passing through.

    `axes` names each dimension of the activation (see `AXES`), e.g. `("batch", "pos", "d_model")`.
    `stack` ("encoder" | "decoder") is normally inherited from the enclosing module's `hook_stack`
    (set it here only for points outside any stack module). `alias`: an extra short name for
    `act_name`. `note`: when the point exists only under some configuration, how to get it (shown
    when a name is unknown).
    """

    def __init__(
        self,
        axes: Sequence[str] | None = None,
        *,
        stack: str | None = None,
        alias: str | None = None,
        note: str = "",
    ) -> None:
        super().__init__()
        if axes is not None and not all(isinstance(a, str) for a in axes):
            raise TypeError(f"HookPoint axes must be axis names (strings), got {axes!r}")
        self.axes: tuple[str, ...] | None = None if axes is None else tuple(axes)
        self.declared_stack = stack
        self.alias = alias
        self.note = note
        self.stack: str | None = stack  # resolved by HookedRootModule.setup from the module tree
        self.key_stack: str | None = None  # the stack whose positions "key_pos" counts (inside attention)
        self.name: str | None = None
        self.local_name: str | None = None  # the name inside its layer ("attn.hook_q"); the name outside layers
        self.fwd_hooks: list[LensHandle] = []
        self.bwd_hooks: list[LensHandle] = []
        self.ctx: dict[Any, Any] = {}  # scratch space shared by this point's hooks

    def forward(self, x: Tensor, io: HookIO | None = None) -> Tensor:
        if io is not None:
            x = io.visit(io.key(self), x)
        return x

    def add_hook(
        self,
        hook: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Register `hook(tensor, hook=self)`. Forward hooks may return a replacement of the same shape;
        backward hooks receive the gradient of this activation and may return a replacement."""
        if dir == "fwd":

            def fwd_wrapper(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
                return self._checked(hook(output, hook=self), output, "forward")

            handle = self.register_forward_hook(fwd_wrapper, prepend=prepend)
            entry = LensHandle(handle, is_permanent, level)
            self.fwd_hooks.insert(0, entry) if prepend else self.fwd_hooks.append(entry)
        elif dir == "bwd":
            entry = LensHandle(None, is_permanent, level)  # type: ignore[arg-type]

            def bwd_wrapper(module: nn.Module, inputs: Any, output: Tensor) -> None:
                if not output.requires_grad:
                    return

                def on_grad(grad: Tensor) -> Tensor | None:
                    if not any(e is entry for e in self.bwd_hooks):  # removed before backward: silent, as TL
                        return None
                    return self._checked(hook(grad, hook=self), grad, "backward")

                output.register_hook(on_grad)

            entry.hook = self.register_forward_hook(bwd_wrapper, prepend=prepend)
            self.bwd_hooks.insert(0, entry) if prepend else self.bwd_hooks.append(entry)
        else:
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")

    def _checked(self, result: Any, original: Tensor, kind: str) -> Tensor | None:
        if result is None:
            return None
        if not isinstance(result, Tensor):
            raise TypeError(f"{kind} hook on {self.name!r} returned {type(result).__name__}; return a Tensor or None")
        if result.shape != original.shape:
            raise ValueError(
                f"{kind} hook on {self.name!r} returned shape {tuple(result.shape)}; "
                f"it must keep the activation's shape {tuple(original.shape)}"
            )
        return result

    def remove_hooks(
        self, dir: Direction | Literal["both"] = "fwd", including_permanent: bool = False, level: int | None = None
    ) -> None:
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")

        def keep(entry: LensHandle) -> bool:
            if entry.is_permanent and not including_permanent:
                return True
            if level is not None and entry.context_level != level:
                return True
            entry.hook.remove()
            return False

        if dir in ("fwd", "both"):
            self.fwd_hooks = [h for h in self.fwd_hooks if keep(h)]
        if dir in ("bwd", "both"):
            self.bwd_hooks = [h for h in self.bwd_hooks if keep(h)]

    def clear_context(self) -> None:
        self.ctx = {}

    def has_hooks(self) -> bool:
        """Python hooks attached (such activations must be computed explicitly)."""
        return bool(self.fwd_hooks or self.bwd_hooks)

    def layer(self) -> int:
        """The layer index in this point's name (`encoder.3.attn.hook_q` -> 3)."""
        if self.name is None:
            raise ValueError("this HookPoint has no name (it is not part of a model's hook_dict)")
        layer = layer_of(self.name)
        if layer is None:
            raise ValueError(f"hook point {self.name!r} is not inside a layer")
        return layer

    def extra_repr(self) -> str:
        return f"name={self.name!r}"

    def spec(self) -> HookSpec:
        """This point's registry entry (needs a name: the point must be set up inside a HookedRootModule)."""
        if self.name is None:
            raise ValueError("this HookPoint has no name (it is not part of a model's hook_dict)")
        layer = layer_of(self.name)
        return HookSpec(
            template=template_of(self.name),
            axes=self.axes,
            stack=self.stack,
            key_stack=self.key_stack,
            alias=self.alias,
            note=self.note,
            layers=frozenset() if layer is None else frozenset({layer}),
        )


# ---- the registry --------------------------------------------------------------------------
# Axis names a HookPoint may declare. "pos": the positions its stack computes in this call (queries);
# "key_pos": the keys an attention attends to (self-attention: the stack's positions, with a KV cache the
# cached ones too; cross-attention: the encoder's). Only "batch", "pos" and "key_pos" vary between calls;
# other names (any string is allowed: "d_sae", ...) are fixed sizes.
AXES = {
    "batch": "B",
    "pos": "pos",
    "key_pos": "key_pos",
    "head": "H",
    "d_head": "d_head",
    "d_model": "d_model",
    "d_mlp": "d_mlp",
    "d_vocab": "d_vocab",
    "1": "1",
}
STACK_LETTERS = {"encoder": "E", "decoder": "D"}


def layer_of(name: str) -> int | None:
    """The layer index in a hook name (`encoder.3.attn.hook_q` -> 3), or None outside the layers."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def local_name(name: str) -> str:
    """The name inside its layer: `encoder.3.attn.hook_q` -> `attn.hook_q` (names outside layers unchanged)."""
    parts = name.split(".")
    return ".".join(parts[2:]) if len(parts) > 2 and parts[1].isdigit() else name


def template_of(name: str) -> str:
    """The name with its layer index as `{l}`: `encoder.3.attn.hook_q` -> `encoder.{l}.attn.hook_q`."""
    return ".".join("{l}" if part.isdigit() else part for part in name.split("."))


@dataclass(frozen=True)
class HookSpec:
    """What the registry knows about one hook point (per layer template)."""

    template: str  # "encoder.{l}.attn.hook_q"
    axes: tuple[str, ...] | None  # ("batch", "pos", "head", "d_head"); None: not declared
    stack: str | None  # the stack whose positions "pos" counts
    key_stack: str | None  # the stack whose positions "key_pos" counts (attention points only)
    alias: str | None = None
    note: str = ""
    layers: frozenset[int] = frozenset()  # the layers that hold it (empty: not inside a layer)

    @property
    def leaf(self) -> str:
        return self.template.rsplit(".", 1)[-1]

    @property
    def layered(self) -> bool:
        return "{l}" in self.template.split(".")

    @property
    def owner(self) -> str:
        """The submodule inside its layer (or the root) holding it: "", "attn", "cross_attn", "mlp", "ln1", ..."""
        parts = self.template.split(".")[:-1]
        if self.layered:
            parts = parts[parts.index("{l}") + 1 :]
        return ".".join(parts)

    @property
    def short_names(self) -> tuple[str, ...]:
        """Names `act_name` knows it by: the leaf without `hook_` (`rel_pos_hook` -> `rel_pos`), and its alias."""
        short = self.leaf.removeprefix("hook_").removesuffix("_hook")
        return (short,) if self.alias is None else (short, self.alias)

    @property
    def attn(self) -> str | None:
        """ "self" or "cross" for points inside an attention module, else None."""
        if self.key_stack is None:
            return None
        return "self" if self.key_stack == self.stack else "cross"

    def position_axes(self) -> tuple[str | None, ...]:
        """Per axis: "batch", the stack whose positions it counts ("encoder" / "decoder"), or None (fixed size)."""
        if self.axes is None:
            raise ValueError(f"hook point {self.template!r} declares no axes: construct it as HookPoint(axes)")
        labels = {"batch": "batch", "pos": self.stack, "key_pos": self.key_stack}
        return tuple(labels.get(axis) for axis in self.axes)

    @property
    def side(self) -> str | None:
        """Which stack's run computes it: "decoder" if any axis counts decoder positions, else "encoder"
        if any counts encoder positions (so cross-attention keys/values are encoder-side), else its stack."""
        labels = self.position_axes()
        for stack in ("decoder", "encoder"):
            if stack in labels:
                return stack
        return self.stack

    def shape(self) -> str:
        """The shape for people: `[B, E, d_model]`, `[B, H, D, E]`, `[B, pos, d_mlp]` ({s} templates)."""
        if self.axes is None:
            return "?"
        letters = {"pos": self.stack, "key_pos": self.key_stack}
        out = []
        for axis in self.axes:
            stack = letters.get(axis)
            if axis in letters and stack in STACK_LETTERS and not self.template.startswith("{s}"):
                out.append(STACK_LETTERS[stack])
            elif axis == "key_pos" and self.attn == "self":
                out.append("pos")
            else:
                out.append(AXES.get(axis, axis))
        return "[" + ", ".join(out) + "]"


class HookLayout(Mapping):
    """The registry: one `HookSpec` per hook template of a model, in model order (a read-only mapping)."""

    def __init__(self, points: Iterable[HookPoint]) -> None:
        specs: dict[str, HookSpec] = {}
        for point in points:
            spec = point.spec()
            seen = specs.get(spec.template)
            if seen is not None:
                if (seen.axes, seen.stack, seen.key_stack) != (spec.axes, spec.stack, spec.key_stack):
                    raise ValueError(f"hook points of {spec.template!r} disagree: {seen} vs {spec}")
                spec = HookSpec(**{**seen.__dict__, "layers": seen.layers | spec.layers})
            specs[spec.template] = spec
        self._specs = specs

    @classmethod
    def of(cls, module: nn.Module) -> HookLayout:
        return cls(m for m in module.modules() if isinstance(m, HookPoint))

    def __getitem__(self, template: str) -> HookSpec:
        return self._specs[template]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> HookSpec:
        """The spec of a full hook name; ValueError (with close names) if this layout has no such point."""
        found = self._specs.get(template_of(name))
        if found is None:
            raise ValueError(unknown_name_message(template_of(name), list(self._specs)))
        return found

    def match(self, pattern: str) -> list[HookSpec]:
        """Specs whose template a name or glob matches (its layer index read as any layer)."""
        wanted = template_of(pattern)
        return [s for t, s in self._specs.items() if fnmatch.fnmatchcase(t, wanted) or fnmatch.fnmatchcase(t, pattern)]

    def n_layers(self, stack: str) -> int:
        return max((max(s.layers) + 1 for s in self.values() if s.stack == stack and s.layers), default=0)

    def rows(self) -> list[tuple[str, str, str]]:
        """The hook table (hook names, shape, note): encoder/decoder templates that agree merge into `{s}`,
        and points of one module with the same shape share a row."""
        merged: dict[str, HookSpec] = {}
        for spec in self.values():
            if spec.stack in STACK_LETTERS and spec.template.startswith(spec.stack + "."):
                other_stack = "decoder" if spec.stack == "encoder" else "encoder"
                other = self._specs.get(other_stack + spec.template[len(spec.stack) :])
                if other is not None and other.axes == spec.axes and other.attn == spec.attn:
                    generic = "{s}" + spec.template[len(spec.stack) :]
                    if generic not in merged:
                        merged[generic] = HookSpec(**{**spec.__dict__, "template": generic})
                    continue
            merged[spec.template] = spec
        rows: dict[tuple[str, str, str], list[str]] = {}
        for spec in merged.values():
            template = spec.template
            if spec.layers == frozenset({0}) and self.n_layers(spec.stack) > 1:
                template = template.replace("{l}", "0")  # held by layer 0 only
            prefix, _, leaf = template.rpartition(".")
            rows.setdefault((prefix, spec.shape(), spec.note), []).append(leaf)
        return [
            (f"{prefix + '.' if prefix else ''}{' / '.join(leaves)}", shape, note)
            for (prefix, shape, note), leaves in rows.items()
        ]

    def markdown_table(self) -> str:
        lines = ["| hook | shape | note |", "|---|---|---|"]
        lines += [f"| `{names}` | `{shape}` | {note} |" for names, shape, note in self.rows()]
        return "\n".join(lines)


_default_layout: Callable[[], HookLayout] | None = None


def set_default_layout(factory: Callable[[], HookLayout]) -> None:
    """Register the layout that `act_name` and the export axes read when no model is given
    (t5hooks.model registers HookedEncoderDecoder's)."""
    global _default_layout
    _default_layout = factory


def default_layout() -> HookLayout:
    if _default_layout is None:
        raise RuntimeError("no default hook layout registered (import t5hooks first)")
    return _default_layout()


class HookedRootModule(nn.Module):
    """A module whose HookPoints are addressable by name (`hook_dict`) with TransformerLens's hook API."""

    def __init__(self) -> None:
        super().__init__()
        self.mod_dict: dict[str, nn.Module] = {}
        self.hook_dict: dict[str, HookPoint] = {}
        self.context_level = 0

    def setup(self) -> None:
        """Index every submodule by name and give every HookPoint its name, stack and key stack (from the
        nearest enclosing module's `hook_stack` / `hook_key_stack`). Call after building submodules."""
        self.mod_dict = {}
        self.hook_dict = {}

        def visit(module: nn.Module, prefix: str, stack: str | None, key_stack: str | None) -> None:
            for child_name, child in module.named_children():
                name = f"{prefix}{child_name}"
                self.mod_dict[name] = child
                child_stack = getattr(child, "hook_stack", None) or stack
                child_key_stack = getattr(child, "hook_key_stack", None) or key_stack
                if isinstance(child, HookPoint):
                    child.name = name
                    child.local_name = local_name(name)
                    child.stack = child.declared_stack or child_stack
                    child.key_stack = child_key_stack
                    self.hook_dict[name] = child
                visit(child, name + ".", child_stack, child_key_stack)

        visit(self, "", None, None)
        self.__dict__.pop("layout", None)

    def hook_points(self) -> list[HookPoint]:
        return list(self.hook_dict.values())

    @cached_property
    def layout(self) -> HookLayout:
        """This model's hook registry (rebuilt by `setup`)."""
        return HookLayout(self.hook_dict.values())

    @classmethod
    def reference_layout(cls) -> HookLayout | None:
        """The layout of this class with every optional hook point switched on (for hints about names that
        exist only under some configuration). None when the class does not provide one."""
        return None

    # ---- names -------------------------------------------------------------------------
    def resolve_names(self, names: NameFilter) -> list[str]:
        """Hook names selected by an exact name, a glob, a predicate, or a list of names/globs, in model order.

        Raises ValueError for a name or glob that matches nothing, suggesting close valid names.
        """
        all_names = list(self.hook_dict)
        if names is None:
            return all_names
        if callable(names):
            return [n for n in all_names if names(n)]
        patterns = [names] if isinstance(names, str) else list(names)
        selected: set[str] = set()
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"hook names must be strings, globs or a predicate, got {pattern!r}")
            if any(ch in pattern for ch in "*?["):
                matched = fnmatch.filter(all_names, pattern)
            else:
                matched = [pattern] if pattern in self.hook_dict else []
            if not matched:
                raise ValueError(unknown_name_message(pattern, all_names, self._name_hint(pattern)))
            selected.update(matched)
        return [n for n in all_names if n in selected]

    def _name_hint(self, name: str) -> str:
        """The `note` of a point that exists only under some configuration (another config or layer)."""
        reference = type(self).reference_layout()
        if reference is None:
            return ""
        layer = layer_of(name)
        for spec in reference.match(name):
            if not spec.note:
                continue
            own = self.layout.get(spec.template)
            some_layers = spec.layers != frozenset(range(reference.n_layers(spec.stack)))
            if own is None or (some_layers and layer is not None and layer not in spec.layers):
                return f"({spec.note})"
        return ""

    # ---- adding and removing hooks -----------------------------------------------------
    def check_hooks_to_add(self, hook_point_name: str, hook: HookFn, dir: Direction = "fwd", **kwargs: Any) -> None:
        """Override to refuse hooks (called once per resolved name before any is added)."""

    def add_hook(
        self,
        name: NameFilter,
        hook: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> None:
        """Add `hook` to every hook point `name` selects (a name, glob, list, or predicate)."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(hook):
            raise TypeError(f"hook must be callable fn(tensor, hook), got {type(hook).__name__}")
        resolved = self.resolve_names(name)
        for hook_name in resolved:
            self.check_hooks_to_add(hook_name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)
        for hook_name in resolved:
            self.hook_dict[hook_name].add_hook(hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend)

    def add_perma_hook(self, name: NameFilter, hook: HookFn, dir: Direction = "fwd") -> None:
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(
        self,
        direction: Direction | Literal["both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        for hp in self.hook_dict.values():
            hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hp in self.hook_dict.values():
            hp.clear_context()

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Direction | Literal["both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove hooks (permanent ones survive unless `including_permanent`)."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)

    def _resolve_hook_list(
        self, hooks: Sequence[tuple[NameFilter, HookFn]], dir: Direction
    ) -> list[tuple[str, HookFn]]:
        resolved = []
        for item in hooks:
            if not (isinstance(item, tuple) and len(item) == 2 and callable(item[1])):
                raise TypeError(f"{dir}_hooks entries must be (name_or_filter, fn) pairs, got {item!r}")
            name, fn = item
            for hook_name in self.resolve_names(name):
                self.check_hooks_to_add(hook_name, fn, dir=dir)
                resolved.append((hook_name, fn))
        return resolved

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
        bwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        interventions: Mapping[str, nn.Module] | None = None,
    ) -> Iterator[HookedRootModule]:
        """Context manager: hooks added on entry, removed on exit (only those added by this context).

        `interventions={name_or_glob: module}` splices modules in eagerly, as `capture(intervene=...)` does in
        the graph (same protocol, see `apply_intervention`); side outputs land in `hook_dict[name].ctx[output]`.
        """
        fwd_hooks = [*fwd_hooks, *(intervention_hook(name, m) for name, m in (interventions or {}).items())]
        fwd = self._resolve_hook_list(fwd_hooks, "fwd")
        bwd = self._resolve_hook_list(bwd_hooks, "bwd")
        self.context_level += 1
        # A fresh id per context (not the nesting depth): hooks a context left behind (reset_hooks_end=False)
        # belong to no later context, so a later context's exit never removes them.
        self._context_ids = getattr(self, "_context_ids", 0) + 1
        level = self._context_ids
        try:
            for name, fn in fwd:
                self.hook_dict[name].add_hook(fn, dir="fwd", level=level)
            for name, fn in bwd:
                self.hook_dict[name].add_hook(fn, dir="bwd", level=level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=level)
            self.context_level -= 1

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
        bwd_hooks: Sequence[tuple[NameFilter, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        interventions: Mapping[str, nn.Module] | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model once with temporary hooks (and `interventions`, as in `hooks`)."""
        if bwd_hooks and reset_hooks_end:
            warnings.warn(
                "run_with_hooks removes its hooks when it returns, before any backward pass; to use bwd_hooks, "
                "call backward inside `with model.hooks(bwd_hooks=...)` or pass reset_hooks_end=False",
                stacklevel=2,
            )
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts, interventions):
            return self(*model_args, **model_kwargs)

    # ---- caching -----------------------------------------------------------------------
    def get_caching_hooks(
        self,
        names_filter: NameFilter = None,
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, Tensor] | None = None,
    ) -> tuple[dict[str, Tensor], list[tuple[str, HookFn]], list[tuple[str, HookFn]]]:
        """Hooks that store (detached) activations, and with `incl_bwd` their gradients as `name + "_grad"`."""
        cache = {} if cache is None else cache
        names = self.resolve_names(names_filter)

        def store(key_suffix: str) -> HookFn:
            def save(tensor: Tensor, hook: HookPoint) -> None:
                value = tensor.detach()
                if device is not None:
                    value = value.to(device)
                if remove_batch_dim:
                    value = value[0]
                cache[hook.name + key_suffix] = value

            return save

        fwd = [(n, store("")) for n in names]
        bwd = [(n, store("_grad")) for n in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(
        self,
        names_filter: NameFilter = None,
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        cache: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Permanently-until-reset add caching hooks; returns the dict they fill."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for name, fn in fwd:
            self.hook_dict[name].add_hook(fn, dir="fwd")
        for name, fn in bwd:
            self.hook_dict[name].add_hook(fn, dir="bwd")
        return cache

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NameFilter = None,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """Run the model, returning (output, {hook name: activation}).

        With `incl_bwd`, backward runs on the output, which must then be a scalar (e.g. `return_type="loss"`),
        and gradients are cached as `name + "_grad"`."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim)
        with self.hooks(fwd, bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not (isinstance(out, Tensor) and out.ndim == 0):
                    raise ValueError("run_with_cache(incl_bwd=True) needs a scalar output; use return_type='loss'")
                out.backward()
        return out, cache


def unknown_name_message(name: str, valid: Sequence[str], hint: str = "") -> str:
    """'no hook point named X' with the closest valid names (and a configuration hint when one applies)."""
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    msg = f"no hook point matches {name!r}"
    if close:
        msg += f"; did you mean: {', '.join(close)}?"
    else:
        msg += f" ({len(valid)} hook points exist, e.g. {', '.join(valid[:3])})"
    if hint:
        msg += f" {hint}"
    return msg
