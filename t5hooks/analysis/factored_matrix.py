"""Low-rank matrices kept as a product of two factors.

``FactoredMatrix(A, B)`` stands for ``A @ B`` without forming it. ``A`` is ``[..., ldim, mdim]``,
``B`` is ``[..., mdim, rdim]`` and the leading dims broadcast, so a whole model's QK or OV
circuits (``[n_layers, n_heads, d_model, d_head] @ [n_layers, n_heads, d_head, d_model]``) fit in
one object. The SVD, eigenvalues, norm and corners are all computed from the factors, at a cost set
by the small hidden dim ``mdim``, never by ``ldim * rdim``.

The public API follows TransformerLens's ``FactoredMatrix``, including its SVD convention: ``svd()``
returns ``(U, S, Vh)`` where ``Vh`` is really ``V`` (``[..., rdim, k]``), so that
``U @ S.diag_embed() @ Vh.mH == AB``.
"""

from __future__ import annotations

import numbers
from typing import Any, Union

import torch

__all__ = ["FactoredMatrix"]

Scalar = Union[int, float, complex, bool, torch.Tensor]
Operand = Union[torch.Tensor, "FactoredMatrix"]

# torch.linalg has no half-precision QR / SVD / eig kernels, so these are computed in float32.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _broadcast_leading(a: torch.Size, b: torch.Size, what: str) -> torch.Size:
    """Broadcast two leading-dim shapes, raising ValueError that names both full shapes."""
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError as exc:
        raise ValueError(f"{what}: leading (batch) dims must be broadcastable, got {tuple(a)} and {tuple(b)}") from exc


def _as_int(i: Any) -> int | None:
    """The index as a Python int if it is a single integer (int, numpy int, 0-d int tensor)."""
    if isinstance(i, bool):
        return None
    if isinstance(i, numbers.Integral):
        return int(i)
    if isinstance(i, torch.Tensor) and i.ndim == 0 and not i.dtype.is_floating_point:
        if i.dtype != torch.bool:
            return int(i.item())
    return None


def _keep_dim(i: int, size: int, which: str) -> slice:
    """Turn an integer index into a length-1 slice, so the indexed matrix dim is kept."""
    if not -size <= i < size:
        raise IndexError(f"index {i} is out of range for the {which} dim of size {size}")
    if i < 0:
        i += size
    return slice(i, i + 1)


class FactoredMatrix:
    """The product ``A @ B``, kept as its two factors.

    Args:
        A: ``[..., ldim, mdim]``.
        B: ``[..., mdim, rdim]``; leading dims broadcast against A's.

    After construction ``A`` and ``B`` are broadcast (as views, without copying) to the common
    leading shape, so ``A.shape[:-2] == B.shape[:-2] == shape[:-2]``.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            raise TypeError(
                f"FactoredMatrix factors must be torch.Tensor, got {type(A).__name__} and {type(B).__name__}"
            )
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(
                "FactoredMatrix factors must have at least 2 dims (A: [..., ldim, mdim], "
                f"B: [..., mdim, rdim]), got A.shape={tuple(A.shape)}, B.shape={tuple(B.shape)}"
            )
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(
                "FactoredMatrix needs A.shape[-1] == B.shape[-2] (A: [..., ldim, mdim], "
                f"B: [..., mdim, rdim]), got A.shape={tuple(A.shape)}, B.shape={tuple(B.shape)}"
            )
        if A.dtype != B.dtype or A.device != B.device:
            raise ValueError(
                "FactoredMatrix factors must share dtype and device, got "
                f"A: {A.dtype} on {A.device}, B: {B.dtype} on {B.device}"
            )
        leading = _broadcast_leading(
            A.shape[:-2],
            B.shape[:-2],
            f"FactoredMatrix got A.shape={tuple(A.shape)}, B.shape={tuple(B.shape)}",
        )
        self.ldim: int = A.shape[-2]
        self.mdim: int = A.shape[-1]
        self.rdim: int = B.shape[-1]
        self.has_leading_dims: bool = A.ndim > 2 or B.ndim > 2
        self.shape: torch.Size = torch.Size((*leading, self.ldim, self.rdim))
        self.A: torch.Tensor = A.broadcast_to((*leading, self.ldim, self.mdim))
        self.B: torch.Tensor = B.broadcast_to((*leading, self.mdim, self.rdim))
        # ((A, B, A._version, B._version), (U, S, Vh)) of the last svd() call.
        self._svd_cache: tuple[tuple, tuple[torch.Tensor, ...]] | None = None

    # ------------------------------------------------------------------ basic views

    @property
    def ndim(self) -> int:
        """Number of dims of the product, leading dims included."""
        return len(self.shape)

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors ``(A [..., ldim, mdim], B [..., mdim, rdim])``."""
        return (self.A, self.B)

    @property
    def AB(self) -> torch.Tensor:
        """The materialised product ``[..., ldim, rdim]`` (can be large)."""
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        """The reverse product ``B @ A``, ``[..., mdim, mdim]``; needs ``ldim == rdim``."""
        if self.ldim != self.rdim:
            raise ValueError(
                f"BA needs a square product (ldim == rdim), got shape {tuple(self.shape)} "
                f"(ldim={self.ldim}, rdim={self.rdim})"
            )
        return self.B @ self.A

    @property
    def T(self) -> FactoredMatrix:
        """Transpose of the last two dims: ``B^T @ A^T``, ``[..., rdim, ldim]``."""
        return FactoredMatrix(self.B.transpose(-2, -1), self.A.transpose(-2, -1))

    def transpose(self) -> FactoredMatrix:
        """Same as :attr:`T`."""
        return self.T

    def __repr__(self) -> str:
        return f"FactoredMatrix: Shape({self.shape}), Hidden Dim({self.mdim})"

    # ------------------------------------------------------------------ products

    def __matmul__(self, other: Operand) -> Union[torch.Tensor, FactoredMatrix]:
        """``self @ other``.

        * ``other`` a vector ``[rdim]``: returns the tensor ``[..., ldim]``.
        * ``other`` a matrix ``[..., rdim, n]``: returns a FactoredMatrix ``[..., ldim, n]``.
        * ``other`` a FactoredMatrix ``[..., rdim, n]``: returns a FactoredMatrix whose hidden dim
          is the smallest of ``self.mdim``, ``other.mdim`` and ``self.rdim``.
        """
        if isinstance(other, FactoredMatrix):
            what = f"FactoredMatrix {tuple(self.shape)} @ FactoredMatrix {tuple(other.shape)}"
            if other.ldim != self.rdim:
                raise ValueError(f"{what}: needs other.ldim == self.rdim ({self.rdim})")
            _broadcast_leading(self.shape[:-2], other.shape[:-2], what)
            m1, mid, m2 = self.mdim, self.rdim, other.mdim
            if m1 <= m2 and m1 <= mid:
                return FactoredMatrix(self.A, (self.B @ other.A) @ other.B)
            if m2 <= mid:
                return FactoredMatrix(self.A @ (self.B @ other.A), other.B)
            return FactoredMatrix(self.AB, other.AB)
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        what = f"FactoredMatrix {tuple(self.shape)} @ tensor {tuple(other.shape)}"
        if other.ndim == 0:
            raise ValueError(f"{what}: use * for scalars")
        if other.ndim == 1:
            if other.shape[0] != self.rdim:
                raise ValueError(f"{what}: vector must have length rdim ({self.rdim})")
            return (self.A @ (self.B @ other.unsqueeze(-1))).squeeze(-1)
        if other.shape[-2] != self.rdim:
            raise ValueError(f"{what}: needs other.shape[-2] == rdim ({self.rdim})")
        _broadcast_leading(self.shape[:-2], other.shape[:-2], what)
        if self.mdim <= self.rdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other: Operand) -> Union[torch.Tensor, FactoredMatrix]:
        """``other @ self``.

        * ``other`` a vector ``[ldim]``: returns the tensor ``[..., rdim]``.
        * ``other`` a matrix ``[..., n, ldim]``: returns a FactoredMatrix ``[..., n, rdim]``.
        """
        if isinstance(other, FactoredMatrix):
            return other.__matmul__(self)
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        what = f"tensor {tuple(other.shape)} @ FactoredMatrix {tuple(self.shape)}"
        if other.ndim == 0:
            raise ValueError(f"{what}: use * for scalars")
        if other.shape[-1] != self.ldim:
            raise ValueError(f"{what}: needs other.shape[-1] == ldim ({self.ldim})")
        if other.ndim == 1:
            return ((other.unsqueeze(-2) @ self.A) @ self.B).squeeze(-2)
        _broadcast_leading(other.shape[:-2], self.shape[:-2], what)
        if self.mdim <= self.ldim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar: Scalar) -> FactoredMatrix:
        """Multiply by a scalar (a number or a one-element tensor); scales ``A``."""
        if isinstance(scalar, torch.Tensor):
            if scalar.numel() != 1:
                raise ValueError(
                    f"FactoredMatrix * tensor needs a one-element tensor, got shape "
                    f"{tuple(scalar.shape)}; use @ for matrix products"
                )
            scalar = scalar.reshape(())
        elif not isinstance(scalar, numbers.Number):
            return NotImplemented
        A = self.A * scalar
        # e.g. a complex scalar promotes A; keep both factors in one dtype.
        return FactoredMatrix(A, self.B.to(A.dtype))

    def __rmul__(self, scalar: Scalar) -> FactoredMatrix:
        """``scalar * self``, same as ``self * scalar``."""
        return self.__mul__(scalar)

    # ------------------------------------------------------------------ decompositions

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Thin SVD of the product, from QR decompositions of the factors.

        With ``k = min(ldim, mdim, rdim)`` returns

        * ``U``  ``[..., ldim, k]``, orthonormal columns,
        * ``S``  ``[..., k]``, singular values in descending order,
        * ``Vh`` ``[..., rdim, k]``, orthonormal columns (TransformerLens naming: this is ``V``),

        such that ``AB == U @ S.diag_embed() @ Vh.mH``.

        ``A = Qa Ra`` and ``B^H = Qb Rb`` give ``AB = Qa (Ra Rb^H) Qb^H``, so only the core
        ``Ra Rb^H`` (at most ``mdim x mdim``) goes through an SVD. The result is cached until A or B
        is replaced or modified in place (not cached while building an autograd graph).
        """
        key = (self.A, self.B, self.A._version, self.B._version)
        cache = self._svd_cache
        if cache is not None:
            (cA, cB, vA, vB), result = cache
            if cA is key[0] and cB is key[1] and (vA, vB) == key[2:]:
                return result
        A, B = self.A, self.B
        if A.dtype in _HALF_DTYPES:
            A, B = A.float(), B.float()
        Qa, Ra = torch.linalg.qr(A)  # [..., ldim, ka], [..., ka, mdim]
        Qb, Rb = torch.linalg.qr(B.mH)  # [..., rdim, kb], [..., kb, mdim]
        Uc, S, Vhc = torch.linalg.svd(Ra @ Rb.mH, full_matrices=False)
        U = (Qa @ Uc).to(self.A.dtype)
        V = (Qb @ Vhc.mH).to(self.A.dtype)
        S = S.to(self.A.dtype) if not self.A.dtype.is_complex else S
        result = (U, S, V)
        building_graph = torch.is_grad_enabled() and (self.A.requires_grad or self.B.requires_grad)
        self._svd_cache = None if building_graph else (key, result)
        return result

    @property
    def U(self) -> torch.Tensor:
        """Left singular vectors ``[..., ldim, k]`` (see :meth:`svd`)."""
        return self.svd()[0]

    @property
    def S(self) -> torch.Tensor:
        """Singular values ``[..., k]``, descending (see :meth:`svd`)."""
        return self.svd()[1]

    @property
    def Vh(self) -> torch.Tensor:
        """Right singular vectors as columns, ``[..., rdim, k]`` (TL naming: this is V)."""
        return self.svd()[2]

    @property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``BA`` (complex, ``[..., mdim]``); needs ``ldim == rdim``.

        The nonzero eigenvalues of ``AB`` and ``BA`` coincide (``BAv = kv`` gives
        ``AB(Av) = k(Av)``), so this costs an ``mdim x mdim`` eigendecomposition. When
        ``mdim > ldim`` the extra ``mdim - ldim`` eigenvalues are zero.
        """
        BA = self.BA
        if BA.dtype in _HALF_DTYPES:
            BA = BA.float()
        return torch.linalg.eigvals(BA)

    def norm(self) -> torch.Tensor:
        """Frobenius norm of the product, ``[...]``: ``sqrt(sum(S**2))``."""
        return self.S.pow(2).sum(-1).sqrt()

    def make_even(self) -> FactoredMatrix:
        """The same product refactored as ``(U sqrt(S)) @ (sqrt(S) V^H)``.

        Both factors carry half of each singular value and have orthogonal columns / rows; the
        hidden dim becomes ``k = min(ldim, mdim, rdim)``.
        """
        U, S, V = self.svd()
        root = S.sqrt().to(U.dtype)
        return FactoredMatrix(U * root[..., None, :], root[..., :, None] * V.mH)

    def collapse_l(self) -> torch.Tensor:
        """Drop the orthonormal left factor ``U``: returns ``S V^H``, ``[..., k, rdim]``."""
        _, S, V = self.svd()
        return S.to(V.dtype)[..., :, None] * V.mH

    def collapse_r(self) -> torch.Tensor:
        """Drop the orthonormal right factor ``V^H``: returns ``U S``, ``[..., ldim, k]``."""
        U, S, _ = self.svd()
        return U * S.to(U.dtype)[..., None, :]

    def get_corner(self, k: int = 3) -> torch.Tensor:
        """Dense top-left corner of the product: every dim (leading dims too) cut to ``:k``.

        Only the needed rows of A and columns of B are multiplied.
        """
        lead = tuple(slice(k) for _ in range(self.ndim - 2))
        return self.A[lead][..., :k, :] @ self.B[lead][..., :, :k]

    # ------------------------------------------------------------------ reshaping / indexing

    def unsqueeze(self, k: int) -> FactoredMatrix:
        """Insert a size-1 leading dim at position ``k`` of :attr:`shape` (torch semantics).

        ``k`` must land among the leading dims (``-ndim-1 <= k <= -3`` or ``0 <= k <= ndim-2``);
        the last two dims are always the matrix dims.
        """
        pos = k + self.ndim + 1 if k < 0 else k
        if not 0 <= pos <= self.ndim - 2:
            raise ValueError(
                f"unsqueeze({k}) on a FactoredMatrix of shape {tuple(self.shape)} would not insert "
                f"a leading dim; k must be in [{-self.ndim - 1}, -3] or [0, {self.ndim - 2}]"
            )
        return FactoredMatrix(self.A.unsqueeze(pos), self.B.unsqueeze(pos))

    def __getitem__(self, idx: Any) -> FactoredMatrix:
        """Index the product like a tensor, returning a FactoredMatrix.

        Leading dims take any tensor index (ints, slices, ``None``, index tensors, ``...``). The
        last two dims (rows of A, columns of B) take slices, index lists / tensors or ints; an int
        keeps its dim with size 1, since the result must stay a matrix.
        """
        if not isinstance(idx, tuple):
            idx = (idx,)

        def consumed(i: Any) -> int:
            if i is None or i is Ellipsis:
                return 0
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                return max(i.ndim, 1)
            return 1

        n_ellipsis = sum(1 for i in idx if i is Ellipsis)
        if n_ellipsis > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        n_used = sum(consumed(i) for i in idx)
        if n_used > self.ndim:
            raise IndexError(f"too many indices for FactoredMatrix of shape {tuple(self.shape)}: {n_used} given")
        if n_ellipsis:
            at = next(j for j, i in enumerate(idx) if i is Ellipsis)
            fill = (slice(None),) * (self.ndim - n_used)
            idx = idx[:at] + fill + idx[at + 1 :]

        # Split into the index over leading dims and (row, col) indices over the matrix dims.
        n_lead = self.ndim - 2
        lead: list[Any] = []
        used = 0
        pos = 0
        while pos < len(idx) and (used < n_lead or idx[pos] is None):
            if used + consumed(idx[pos]) > n_lead:
                raise IndexError(
                    f"index {idx[pos]!r} spans the leading and matrix dims of a FactoredMatrix "
                    f"of shape {tuple(self.shape)}"
                )
            used += consumed(idx[pos])
            lead.append(idx[pos])
            pos += 1
        rest = idx[pos:]
        if any(i is None for i in rest):
            raise IndexError("None (new axis) is only allowed among the leading dims")
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.ndim > 1 for i in rest):
            raise IndexError("a multi-dim boolean mask cannot index the matrix dims")

        A, B = self.A, self.B
        if lead:
            A, B = A[tuple(lead)], B[tuple(lead)]
        if len(rest) >= 1:
            rows = rest[0]
            if _as_int(rows) is not None:
                rows = _keep_dim(_as_int(rows), self.ldim, "row (ldim)")
            A = A[..., rows, :]
        if len(rest) == 2:
            cols = rest[1]
            if _as_int(cols) is not None:
                cols = _keep_dim(_as_int(cols), self.rdim, "column (rdim)")
            B = B[..., :, cols]
        return FactoredMatrix(A, B)
