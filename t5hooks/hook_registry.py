"""The hook registry: what every hook point is — its axes, its stack, the token stream it counts.

Every `HookPoint` declares the axes of its activation (`HookPoint(("batch", "pos", "d_model"))`); its name,
stack and key stack come from where it sits in the module tree. `HookLayout` collects these declarations as
`HookSpec`s; export axes, the ONNX generator's encoder/decoder split, the store's token streams, live training
activations, `act_name`, unknown-name hints and the README hook table all read it, so a new hook point is one
line in one module.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

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
VARYING_AXES = ("batch", "pos", "key_pos")
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
    def token_stream(self) -> str | None:
        """The stack ("encoder" / "decoder") whose tokens axis 1 counts when the activation is per token
        (`[batch, pos, fixed sizes...]`; cross-attention keys/values count encoder tokens), else None: attention
        scores, patterns and position biases are per (query, key) pair."""
        labels = self.position_axes()  # e.g. ("batch", "encoder", None)
        if len(labels) < 2 or labels[0] != "batch" or labels[1] not in STACK_LETTERS:
            return None
        if any(label in STACK_LETTERS for label in labels[2:]):
            return None
        return labels[1]

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

    def __init__(self, specs: Iterable[HookSpec]) -> None:
        """One spec per hook point (per layer); the specs of one template merge their layers."""
        merged: dict[str, HookSpec] = {}
        for spec in specs:
            seen = merged.get(spec.template)
            if seen is not None:
                if (seen.axes, seen.stack, seen.key_stack) != (spec.axes, spec.stack, spec.key_stack):
                    raise ValueError(f"hook points of {spec.template!r} disagree: {seen} vs {spec}")
                spec = HookSpec(**{**seen.__dict__, "layers": seen.layers | spec.layers})
            merged[spec.template] = spec
        self._specs = merged

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

    def token_stream(self, name: str) -> str:
        """The token stream ("encoder" / "decoder") of a per-token hook; ValueError for any other hook."""
        stream = self.spec(name).token_stream
        if stream is None:
            raise ValueError(
                f"{name!r} is not a per-token activation ([batch, pos, ...]); choose hook_q/k/v/z, hook_result, "
                f"residual, MLP or norm hooks (not attention scores, patterns or position biases)"
            )
        return stream

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
