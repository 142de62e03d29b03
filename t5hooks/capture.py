"""CaptureModule: a fixed set of hook points as explicit outputs (and patch inputs) of an ordinary forward.

Python hooks and `torch.compile(fullgraph=True)` do not mix. Here the captured and patched names
are fixed when the module is built, so to Dynamo, `torch.export` and the ONNX exporter they are
Python constants: the forward is plain tensor code that returns a dict. It runs the model's own
`encode` / `decode` (the same forward as eager runs) with a `HookIO` instead of hooks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

from torch import Tensor, nn

from .components import lm_loss
from .hook_points import PATCH_MODES, HookIO, NameFilter


class CaptureBase(nn.Module):
    """Fixed capture and patch sets over a hooked model, shared by the encoder-decoder and encoder-only captures.

    Subclasses define `INPUT_NAMES` (their forward's tensor inputs, in order), `OUTPUT` (the model's main
    output) and a forward that runs the model with `self.hook_io(patches)` and returns `self.outputs(...)`.
    """

    INPUT_NAMES: tuple[str, ...] = ()
    OUTPUT = ""

    def __init__(
        self,
        model: nn.Module,
        names: NameFilter = (),
        patch: NameFilter = (),
        patch_mode: str | Mapping[str, str] = "replace",
    ) -> None:
        super().__init__()
        self.model = model  # registered as a submodule: the same parameters, not a copy
        self.names: tuple[str, ...] = tuple(model.resolve_names(names)) if _nonempty(names) else ()
        patch_names = tuple(model.resolve_names(patch)) if _nonempty(patch) else ()
        self.patch_modes: dict[str, str] = _patch_modes(patch_names, patch_mode)
        self._capture_set = frozenset(self.names)

    @property
    def patch_names(self) -> tuple[str, ...]:
        return tuple(self.patch_modes)

    def extra_repr(self) -> str:
        return f"capture={len(self.names)} names, patch={self.patch_modes}"

    def hook_io(self, patches: Mapping[str, Tensor] | None) -> HookIO:
        self._check_patches(patches)
        return HookIO(self._capture_set, self.patch_modes, patches)

    def outputs(self, io: HookIO, main: dict[str, Tensor]) -> dict[str, Tensor]:
        """`main` (the model's outputs, in order) then the captured names in hook order."""
        out = dict(main)
        for name in self.names:
            out[name] = io.outputs[name]
        return out

    def _check_patches(self, patches: Mapping[str, Tensor] | None) -> None:
        given = set(patches or {})
        expected = set(self.patch_modes)
        if given != expected:
            missing, unknown = sorted(expected - given), sorted(given - expected)
            parts = []
            if missing:
                parts.append(f"missing patches for {missing}")
            if unknown:
                parts.append(
                    f"patches for {unknown} are not in this module's patch set {sorted(expected)} "
                    f"(fixed when it was built: model.capture(names, patch=...))"
                )
            raise ValueError("; ".join(parts))


class CaptureModule(CaptureBase):
    """`cap(input, decoder_input, ...) -> {"logits": ..., **captured}` sharing the model's parameters.

    Output order: "logits", then "loss" when `labels` are given, then the captured names in the
    model's hook order (`model.hook_dict` order, which follows the forward computation).
    `patches[name]` replaces the activation ("replace", same shape) or is added to it ("add",
    broadcastable, e.g. a steering vector `[d_model]`). A name both patched and captured returns the
    patched value, which is what the rest of the network sees.
    """

    INPUT_NAMES = ("input", "decoder_input", "one_zero_attention_mask", "decoder_attention_mask")
    OUTPUT = "logits"

    def forward(
        self,
        input: Tensor,
        decoder_input: Tensor | None = None,
        one_zero_attention_mask: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        patches: Mapping[str, Tensor] | None = None,
        labels: Tensor | None = None,
    ) -> dict[str, Tensor]:
        model = self.model
        tokens, mask, dec_tokens, dec_mask, labels = model.prepare_inputs(
            input, decoder_input, one_zero_attention_mask, decoder_attention_mask, labels
        )
        io = self.hook_io(patches)
        logits = model.decode(dec_tokens, model.encode(tokens, mask, io), mask, dec_mask, io)
        main = {"logits": logits}
        if labels is not None:
            main["loss"] = lm_loss(logits, labels)
        return self.outputs(io, main)


class EncoderCaptureModule(CaptureBase):
    """`cap(input, one_zero_attention_mask, patches=...) -> {"last_hidden_state": ..., **captured}` for a
    `HookedT5Encoder` (same capture / patch rules as `CaptureModule`)."""

    INPUT_NAMES = ("input", "one_zero_attention_mask")
    OUTPUT = "last_hidden_state"

    def forward(
        self,
        input: Tensor,
        one_zero_attention_mask: Tensor | None = None,
        patches: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        tokens, mask = self.model.prepare_encoder_inputs(input, one_zero_attention_mask)
        io = self.hook_io(patches)
        return self.outputs(io, {"last_hidden_state": self.model.encode(tokens, mask, io)})


def _nonempty(names: NameFilter) -> bool:
    return names is not None and (callable(names) or isinstance(names, str) or len(names) > 0)


def _patch_modes(patch_names: tuple[str, ...], patch_mode: str | Mapping[str, str]) -> dict[str, str]:
    """One mode for every patched name, or a per-name (or per-glob) mapping covering all of them."""
    if isinstance(patch_mode, str):
        if patch_mode not in PATCH_MODES:
            raise ValueError(f"patch_mode={patch_mode!r}; valid: {', '.join(PATCH_MODES)}")
        return {name: patch_mode for name in patch_names}
    modes: dict[str, str] = {}
    for pattern, mode in patch_mode.items():
        if mode not in PATCH_MODES:
            raise ValueError(f"patch_mode[{pattern!r}]={mode!r}; valid: {', '.join(PATCH_MODES)}")
        matched = [n for n in patch_names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"patch_mode key {pattern!r} matches nothing in the patch set {list(patch_names)}")
        for name in matched:
            modes[name] = mode
    unset = [n for n in patch_names if n not in modes]
    if unset:
        raise ValueError(f"patch_mode gives no mode for {unset}; valid modes: {', '.join(PATCH_MODES)}")
    return {name: modes[name] for name in patch_names}
