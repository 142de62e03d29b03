"""FactoredMatrix against the dense product computed with torch (float64, seeded)."""

from __future__ import annotations

import pytest
import torch

from t5hooks.analysis.factored_matrix import FactoredMatrix

DT = torch.float64


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT)


def fm(*lead: int, l: int = 6, m: int = 3, r: int = 5, seed: int = 0) -> FactoredMatrix:
    return FactoredMatrix(rand(*lead, l, m, seed=seed), rand(*lead, m, r, seed=seed + 1))


def close(x: torch.Tensor, y: torch.Tensor, **kw) -> None:
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-9, **kw)


def same_multiset(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-8) -> None:
    """Two 1-D complex tensors hold the same values, in any order (greedy nearest matching)."""
    assert a.shape == b.shape, (a, b)
    remaining = list(b)
    for x in a:
        dists = torch.stack([(x - y).abs() for y in remaining])
        j = int(dists.argmin())
        assert dists[j] < tol * (1 + x.abs()), (x, remaining)
        remaining.pop(j)


def nonzero(ev: torch.Tensor, rel: float = 1e-8) -> torch.Tensor:
    return ev[ev.abs() > rel * ev.abs().max()]


# ---------------------------------------------------------------- construction and basic views


def test_shapes_pair_repr():
    f = fm(2, 4)
    assert f.shape == torch.Size([2, 4, 6, 5])
    assert (f.ldim, f.mdim, f.rdim, f.ndim) == (6, 3, 5, 4)
    assert f.has_leading_dims and not fm().has_leading_dims
    A, B = f.pair
    assert A is f.A and B is f.B
    assert repr(f) == "FactoredMatrix: Shape(torch.Size([2, 4, 6, 5])), Hidden Dim(3)"


def test_leading_dims_broadcast():
    A = rand(2, 1, 6, 3)  # e.g. [n_layers, 1, ldim, mdim]
    B = rand(4, 3, 5, seed=1)  # [n_heads, mdim, rdim]
    f = FactoredMatrix(A, B)
    assert f.shape == torch.Size([2, 4, 6, 5])
    assert f.A.shape == (2, 4, 6, 3) and f.B.shape == (2, 4, 3, 5)
    close(f.AB, A @ B)
    g = FactoredMatrix(rand(6, 3), rand(7, 3, 5, seed=1))  # 2-D against batched
    assert g.shape == torch.Size([7, 6, 5])


def test_AB_BA_T():
    f = fm(3, l=6, m=2, r=6)
    close(f.AB, f.A @ f.B)
    close(f.BA, f.B @ f.A)
    assert f.BA.shape == (3, 2, 2)
    for t in (f.T, f.transpose()):
        assert t.shape == torch.Size([3, 6, 6])
        close(t.AB, f.AB.transpose(-2, -1))
    with pytest.raises(ValueError, match="ldim == rdim"):
        _ = fm(l=6, r=5).BA


# ---------------------------------------------------------------- SVD and friends


@pytest.mark.parametrize(
    "lead,l,m,r",
    [((), 6, 3, 5), ((2, 3), 7, 2, 4), ((), 3, 5, 4), ((2,), 5, 6, 2), ((), 4, 4, 4)],
)
def test_svd_matches_dense(lead, l, m, r):
    f = fm(*lead, l=l, m=m, r=r)
    k = min(l, m, r)
    U, S, Vh = f.svd()
    assert U.shape == (*lead, l, k) and S.shape == (*lead, k) and Vh.shape == (*lead, r, k)
    close(U @ torch.diag_embed(S) @ Vh.transpose(-2, -1), f.AB)
    eye = torch.eye(k, dtype=DT).expand(*lead, k, k)
    close(U.transpose(-2, -1) @ U, eye)
    close(Vh.transpose(-2, -1) @ Vh, eye)
    close(S, torch.linalg.svdvals(f.AB)[..., :k])
    assert (S[..., :-1] >= S[..., 1:]).all()
    close(f.U, U)
    close(f.S, S)
    close(f.Vh, Vh)


def test_svd_rank_deficient_and_cached():
    A = rand(6, 3)
    A[:, 2] = A[:, 0] + A[:, 1]  # product has rank 2 < mdim
    f = FactoredMatrix(A, rand(3, 5, seed=1))
    U, S, Vh = f.svd()
    close(U @ torch.diag_embed(S) @ Vh.T, f.AB)
    close(S, torch.linalg.svdvals(f.AB)[:3])
    assert S[-1].abs() < 1e-10
    assert f.svd()[0] is U  # cached
    with torch.no_grad():
        f.A.mul_(2.0)  # in-place change invalidates the cache
    close(f.S, 2 * S)


def test_svd_low_precision_and_complex():
    h = FactoredMatrix(rand(6, 3).bfloat16(), rand(3, 5, seed=1).bfloat16())
    U, S, Vh = h.svd()
    assert U.dtype == S.dtype == Vh.dtype == torch.bfloat16
    dense = h.AB.double()
    torch.testing.assert_close(S.double(), torch.linalg.svdvals(dense)[:3], rtol=3e-2, atol=3e-2)
    c = FactoredMatrix(
        torch.complex(rand(5, 3), rand(5, 3, seed=2)),
        torch.complex(rand(3, 4, seed=3), rand(3, 4, seed=4)),
    )
    U, S, Vh = c.svd()
    close(U @ torch.diag_embed(S.to(U.dtype)) @ Vh.mH, c.AB)
    close(S, torch.linalg.svdvals(c.AB)[:3])


def test_svd_gradient_flows():
    A = rand(5, 2).requires_grad_()
    B = rand(2, 4, seed=1).requires_grad_()
    FactoredMatrix(A, B).norm().backward()
    dense_A = A.detach().clone().requires_grad_()
    torch.linalg.matrix_norm(dense_A @ B.detach()).backward()
    close(A.grad, dense_A.grad)


def test_norm():
    f = fm(2, 3, l=7, m=3, r=4)
    n = f.norm()
    assert n.shape == (2, 3)
    close(n, torch.linalg.matrix_norm(f.AB, ord="fro"))
    close(fm(m=8).norm(), torch.linalg.matrix_norm(fm(m=8).AB))


def test_make_even():
    f = fm(2, l=6, m=3, r=5)
    e = f.make_even()
    close(e.AB, f.AB)
    S = f.S
    close(e.A.transpose(-2, -1) @ e.A, torch.diag_embed(S))
    close(e.B @ e.B.transpose(-2, -1), torch.diag_embed(S))


def test_collapse_l_r():
    f = fm(2, l=6, m=3, r=5)
    cl, cr = f.collapse_l(), f.collapse_r()
    assert cl.shape == (2, 3, 5) and cr.shape == (2, 6, 3)
    close(f.U @ cl, f.AB)
    close(cr @ f.Vh.transpose(-2, -1), f.AB)
    # Dropping an orthonormal factor keeps the Gram matrix on the other side.
    close(cl.transpose(-2, -1) @ cl, f.AB.transpose(-2, -1) @ f.AB)
    close(cr @ cr.transpose(-2, -1), f.AB @ f.AB.transpose(-2, -1))


# ---------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("l,m", [(6, 3), (4, 4), (3, 5)])
def test_eigenvalues_match_dense(l, m):
    f = fm(2, l=l, m=m, r=l)
    ev = f.eigenvalues
    assert ev.shape == (2, m) and ev.is_complex()
    dense = torch.linalg.eigvals(f.AB)
    for i in range(2):
        same_multiset(nonzero(ev[i]), nonzero(dense[i]))
    if m > l:  # BA has m - l extra zero eigenvalues
        assert (ev.abs().sort(-1).values[..., : m - l] < 1e-10).all()


def test_eigenvalues_need_square():
    with pytest.raises(ValueError, match="ldim == rdim"):
        _ = fm(l=6, r=5).eigenvalues


# ---------------------------------------------------------------- corner


def test_get_corner():
    f = fm(l=6, m=3, r=5)
    close(f.get_corner(), f.AB[:3, :3])
    close(f.get_corner(2), f.AB[:2, :2])
    close(f.get_corner(10), f.AB)
    g = fm(4, 2, l=6, m=3, r=5)  # leading dims are cut too, as in TransformerLens
    c = g.get_corner(3)
    assert c.shape == (3, 2, 3, 3)
    close(c, g.AB[:3, :3, :3, :3])


# ---------------------------------------------------------------- products


def test_matmul_vector_both_sides():
    f = fm(2, 3, l=6, m=3, r=5)
    v, w = rand(5, seed=7), rand(6, seed=8)
    out = f @ v
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 6)
    close(out, f.AB @ v)
    out = w @ f
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 5)
    close(out, w @ f.AB)


@pytest.mark.parametrize("m", [2, 8])  # hidden dim below / above the dims it is compared with
def test_matmul_matrix_both_sides(m):
    f = fm(l=6, m=m, r=5)
    M = rand(5, 4, seed=7)
    out = f @ M
    assert isinstance(out, FactoredMatrix) and out.shape == torch.Size([6, 4])
    assert out.mdim == min(m, 5)
    close(out.AB, f.AB @ M)
    N = rand(7, 6, seed=8)
    out = N @ f
    assert isinstance(out, FactoredMatrix) and out.shape == torch.Size([7, 5])
    assert out.mdim == min(m, 6)
    close(out.AB, N @ f.AB)


def test_matmul_matrix_broadcasts_leading_dims():
    f = fm(2, 1, l=6, m=3, r=5)
    M = rand(4, 5, 7, seed=7)
    out = f @ M
    assert out.shape == torch.Size([2, 4, 6, 7])
    close(out.AB, f.AB @ M)
    N = rand(4, 2, 6, seed=8)
    out = N @ f
    assert out.shape == torch.Size([2, 4, 2, 5])
    close(out.AB, N @ f.AB)


@pytest.mark.parametrize(
    "m1,mid,m2,hidden",
    [(2, 6, 4, 2), (5, 6, 3, 3), (5, 2, 4, 2), (3, 3, 3, 3)],
)
def test_matmul_factored(m1, mid, m2, hidden):
    f = fm(2, l=7, m=m1, r=mid, seed=0)
    g = fm(2, l=mid, m=m2, r=4, seed=5)
    out = f @ g
    assert isinstance(out, FactoredMatrix) and out.shape == torch.Size([2, 7, 4])
    assert out.mdim == hidden  # the smallest available inner dim is kept
    close(out.AB, f.AB @ g.AB)
    close(f.__rmatmul__(fm(2, l=3, m=2, r=7, seed=9)).AB, fm(2, l=3, m=2, r=7, seed=9).AB @ f.AB)


def test_matmul_errors():
    f = fm(2, l=6, m=3, r=5)
    with pytest.raises(ValueError, match=r"rdim \(5\)"):
        f @ rand(4)
    with pytest.raises(ValueError, match=r"rdim \(5\)"):
        f @ rand(4, 2)
    with pytest.raises(ValueError, match=r"ldim \(6\)"):
        rand(5) @ f
    with pytest.raises(ValueError, match=r"ldim \(6\)"):
        rand(2, 5) @ f
    with pytest.raises(ValueError, match="broadcastable"):
        f @ rand(3, 5, 2)
    with pytest.raises(ValueError, match="broadcastable"):
        rand(3, 2, 6) @ f
    with pytest.raises(ValueError, match="other.ldim"):
        f @ fm(l=4)
    with pytest.raises(ValueError, match=r"use \*"):
        f @ torch.tensor(2.0, dtype=DT)
    with pytest.raises(TypeError):
        f @ [1.0, 2.0]


def test_scalar_mul():
    f = fm(2, l=6, m=3, r=5)
    for s in (3, -0.5, torch.tensor(2.5, dtype=DT), torch.tensor([[2.5]], dtype=DT)):
        for out in (f * s, s * f):
            assert isinstance(out, FactoredMatrix) and out.shape == f.shape
            close(out.AB, f.AB * float(s))
    c = f * 1j
    close(c.AB, f.AB * 1j)
    with pytest.raises(ValueError, match="one-element"):
        f * rand(3)
    with pytest.raises(TypeError):
        f * "2"


# ---------------------------------------------------------------- indexing and reshaping


def test_getitem_leading_dims():
    f = fm(3, 4, l=6, m=3, r=5)
    dense = f.AB
    cases = [
        (1, dense[1]),
        (-1, dense[-1]),
        ((slice(0, 2), 2), dense[0:2, 2]),
        ((None, 1), dense[None, 1]),
        ((Ellipsis, slice(None), slice(None)), dense),
        ((torch.tensor([2, 0]),), dense[torch.tensor([2, 0])]),
        ((torch.tensor([True, False, True]),), dense[torch.tensor([True, False, True])]),
    ]
    for idx, expected in cases:
        out = f[idx]
        assert isinstance(out, FactoredMatrix)
        assert out.shape == expected.shape, idx
        close(out.AB, expected)


def test_getitem_matrix_dims():
    f = fm(3, 4, l=6, m=3, r=5)
    dense = f.AB
    cases = [
        ((0, 1, 2), dense[0, 1, 2:3]),  # an int row keeps its dim
        ((0, 1, slice(1, 4), -1), dense[0, 1, 1:4, -1:]),
        ((Ellipsis, 2, slice(None)), dense[..., 2:3, :]),
        ((Ellipsis, slice(None), -2), dense[..., :, -2:-1]),
        ((Ellipsis, [0, 5], torch.tensor(3)), dense[..., [0, 5], 3:4]),
        ((1, Ellipsis, slice(None, None, 2)), dense[1, ..., ::2]),
        ((slice(None), 0, -1, 4), dense[:, 0, -1:, 4:5]),
    ]
    for idx, expected in cases:
        out = f[idx]
        assert out.shape == expected.shape, idx
        close(out.AB, expected)
    with pytest.raises(IndexError):
        f[0, 0, 0, 0, 0]
    with pytest.raises(IndexError):
        f[0, 0, 6]
    out = f[0, 0, None, 1]  # a new axis before the matrix dims is a new leading dim
    assert out.shape == torch.Size([1, 1, 5])
    close(out.AB, dense[0, 0, None, 1:2])
    with pytest.raises(IndexError, match="None"):
        f[0, 0, 1, None]
    with pytest.raises(IndexError):
        f[..., 1, ...]


def test_unsqueeze():
    f = fm(3, l=6, m=3, r=5)
    for k, shape in [(0, (1, 3, 6, 5)), (1, (3, 1, 6, 5)), (-3, (3, 1, 6, 5)), (-4, (1, 3, 6, 5))]:
        out = f.unsqueeze(k)
        assert out.shape == torch.Size(shape)
        close(out.AB, f.AB.unsqueeze(k))
    for k in (-1, -2, 2, 3, -5):
        with pytest.raises(ValueError, match="leading dim"):
            f.unsqueeze(k)


# ---------------------------------------------------------------- construction errors


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"A.shape\[-1\] == B.shape\[-2\].*\(6, 3\).*\(4, 5\)"):
        FactoredMatrix(rand(6, 3), rand(4, 5))
    with pytest.raises(ValueError, match=r"broadcastable.*\(2,\) and \(3,\)"):
        FactoredMatrix(rand(2, 6, 3), rand(3, 3, 5))
    with pytest.raises(ValueError, match="at least 2 dims"):
        FactoredMatrix(rand(6), rand(6, 5))
    with pytest.raises(ValueError, match="dtype"):
        FactoredMatrix(rand(6, 3), rand(3, 5).float())
    with pytest.raises(TypeError):
        FactoredMatrix([[1.0]], [[1.0]])
