"""Hook points: named identity modules on every interesting activation, TransformerLens style.

Two ways to reach an activation, one forward:

* Python hooks (`add_hook`, `hooks()`, `run_with_hooks`, `run_with_cache`): functions
  `fn(tensor, hook) -> tensor | None` registered on a `HookPoint`, run eagerly.
* A `HookIO` passed down the forward as an argument (hook_io.py): it records the named activations it was
  built for and applies patches and interventions to them, as explicit graph outputs.

`HookedRootModule` names every point from its place in the module tree and keeps the registry of them
(hook_registry.py).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .hook_io import Direction, HookFn, HookIO, NameFilter, intervention_hook
from .hook_registry import HookLayout, HookSpec, layer_of, local_name, template_of, unknown_name_message


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
        self.local_name: str | None = None  # the name inside its layer ("attn.hook_q"); = name outside layers
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

    def add_perma_hook(self, hook: HookFn, dir: Direction = "fwd") -> None:
        """A hook that `reset_hooks()` keeps (only `reset_hooks(including_permanent=True)` removes it)."""
        self.add_hook(hook, dir=dir, is_permanent=True)

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

    def has_hooks(
        self, dir: Direction | Literal["both"] = "both", including_permanent: bool = True, level: int | None = None
    ) -> bool:
        """Python hooks attached in direction `dir` (TransformerLens's signature: `including_permanent=False` skips
        permanent ones, `level` keeps one context's). Activations with hooks are computed explicitly."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        entries = (self.fwd_hooks if dir != "bwd" else []) + (self.bwd_hooks if dir != "fwd" else [])
        return any(
            (including_permanent or not e.is_permanent) and (level is None or e.context_level == level) for e in entries
        )

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
        return HookLayout(point.spec() for point in self.hook_dict.values())

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

    def list_hooks(
        self,
        name_filter: NameFilter = None,
        dir: Direction | Literal["both"] = "both",
        including_permanent: bool = True,
    ) -> dict[str, list[LensHandle]]:
        """TransformerLens's `list_hooks`: the attached hooks by hook point name (points without any left out),
        forward then backward; `name_filter` as everywhere (a name, glob, list or predicate)."""
        if dir not in ("fwd", "bwd", "both"):
            raise ValueError(f"dir must be 'fwd', 'bwd' or 'both', got {dir!r}")
        out = {}
        for name in self.resolve_names(name_filter):
            hp = self.hook_dict[name]
            handles = (hp.fwd_hooks if dir != "bwd" else []) + (hp.bwd_hooks if dir != "fwd" else [])
            handles = [h for h in handles if including_permanent or not h.is_permanent]
            if handles:
                out[name] = handles
        return out

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
