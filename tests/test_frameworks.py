"""Framework integration: compiled == eager, torch module / torch.func / autocast, JAX jit / vmap / optax."""

import numpy as np
import pytest
from backends import B
from reference_loss import reference_loss_and_grad

import driftloss

rng = np.random.default_rng(0)
X, P, Q = rng.normal(size=(2, 12, 5)), rng.normal(size=(2, 10, 5)) + 0.5, rng.normal(size=(2, 6, 5))
W = rng.uniform(size=(2, 6))


def _adapter():
    if B.name == "torch":
        from driftloss.adapters import torch as adapter
    elif B.name == "jax":
        from driftloss.adapters import jax as adapter
    else:
        pytest.skip(f"{B.name} has no adapter (the core is used directly)")
    return adapter


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_equals_eager(dtype):
    if B.compile is None:
        pytest.skip(f"{B.name} has no compiler")
    adapter = _adapter()
    x, p, q, w = (B.asarray(a, dtype) for a in (X, P, Q, W))

    def f(x, p, q, w):
        return adapter.drifting_loss(x, p, q, neg_weight=w)

    eager = float(B.to_numpy(f(x, p, q, w)))
    compiled = float(B.to_numpy(B.compile(f)(x, p, q, w)))
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert abs(compiled - eager) <= tol * abs(eager)
    want, want_grad = reference_loss_and_grad(X, P, Q, neg_weight=W)
    assert abs(compiled - want) <= tol * abs(want)
    g = B.to_numpy(B.grad(lambda xx: B.compile(f)(xx, p, q, w), x))
    assert np.linalg.norm(g - want_grad) <= tol * np.linalg.norm(want_grad)


# ---- torch ------------------------------------------------------------------------------------

def _torch():
    if B.name != "torch":
        pytest.skip("torch adapter tests run in the torch env")
    import torch

    return torch


def test_torch_module_matches_function_and_reference():
    torch = _torch()
    from driftloss.adapters.torch import DriftingLoss

    crit = DriftingLoss(taus=(0.05, 0.2), kernel="y")
    x = torch.tensor(X, requires_grad=True)
    loss = crit(x, torch.tensor(P), torch.tensor(Q), neg_weight=torch.tensor(W))
    loss.backward()
    want, want_grad = reference_loss_and_grad(X, P, Q, (0.05, 0.2), kernel="y", neg_weight=W)
    assert abs(loss.item() - want) <= 1e-12 * want
    np.testing.assert_allclose(x.grad.numpy(), want_grad, rtol=1e-10, atol=1e-14)
    assert "taus=(0.05, 0.2), kernel='y'" in repr(crit)


def test_torch_func_grad_and_vmap():
    torch = _torch()
    from driftloss.adapters.torch import drifting_loss

    p, q = torch.tensor(P), torch.tensor(Q)
    g = torch.func.grad(lambda x: drifting_loss(x, p, q))(torch.tensor(X))
    _, want_grad = reference_loss_and_grad(X, P, Q)
    np.testing.assert_allclose(g.numpy(), want_grad, rtol=1e-10, atol=1e-14)
    # vmap over the leading dim: each slice is an independent call with its own S and lambda.
    per = torch.func.vmap(lambda x, p, q: drifting_loss(x, p, q))(torch.tensor(X), p, q)
    want = [reference_loss_and_grad(X[i], P[i], Q[i])[0] for i in range(2)]
    np.testing.assert_allclose(per.numpy(), want, rtol=1e-10)


def test_torch_autocast_and_half_inputs_stay_float32():
    torch = _torch()
    x = torch.tensor(X, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = driftloss.drifting_loss(x, torch.tensor(P, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32
    p_bf16 = torch.tensor(P, dtype=torch.bfloat16).double().numpy()
    want, _ = reference_loss_and_grad(x.detach().double().numpy(), p_bf16)
    assert abs(loss.item() - want) <= 1e-5 * want
    loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_torch_drift_products_run_in_full_float32_under_a_tf32_setting(monkeypatch):
    """A training script's set_float32_matmul_precision("high") (TF32 on GPUs) does not reach the
    drift's products, and is restored afterwards, also when the drift raises."""
    torch = _torch()
    from backends import driftloss_hooks, swap_hooks

    hook, seen = driftloss_hooks().compute_drift, []

    def spy(*args, **kwargs):
        seen.append(torch.get_float32_matmul_precision())
        return hook(*args, **kwargs)

    def failing(*args, **kwargs):
        raise RuntimeError("drift failed")

    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        swap_hooks(monkeypatch, compute_drift=spy, fused_loss=None)
        driftloss.drifting_loss(torch.tensor(X), torch.tensor(P))
        assert seen == ["highest"] and torch.get_float32_matmul_precision() == "high"
        swap_hooks(monkeypatch, compute_drift=failing, fused_loss=None)
        with pytest.raises(RuntimeError, match="drift failed"):
            driftloss.drifting_loss(torch.tensor(X), torch.tensor(P))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_torch_compile_module_in_a_training_step():
    torch = _torch()
    from driftloss.adapters.torch import DriftingLoss

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    crit = DriftingLoss()
    z, real = torch.randn(32, 4), torch.randn(64, 2) + 2.0

    def step_loss(z, real):
        return crit(net(z), real)

    eager = step_loss(z, real)
    compiled = torch.compile(step_loss, fullgraph=True)(z, real)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    compiled.backward()  # backward outside the compiled region (docs/design.md §7)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


# ---- jax --------------------------------------------------------------------------------------

def _jax():
    if B.name != "jax":
        pytest.skip("jax adapter tests run in the jax env")
    import jax

    return jax


def test_jax_vmap_and_jit_grad():
    jax = _jax()
    from driftloss.adapters.jax import drifting_loss

    per = jax.vmap(lambda x, p, q: drifting_loss(x, p, q))(X, P, Q)
    want = [reference_loss_and_grad(X[i], P[i], Q[i])[0] for i in range(2)]
    np.testing.assert_allclose(np.asarray(per), want, rtol=1e-10)
    g = jax.jit(jax.grad(lambda x: drifting_loss(x, P, Q, neg_weight=W)))(X)
    np.testing.assert_allclose(np.asarray(g), reference_loss_and_grad(X, P, Q, neg_weight=W)[1],
                               rtol=1e-10, atol=1e-14)


def test_jax_optax_step_reduces_the_drift():
    jax = _jax()
    optax = pytest.importorskip("optax", reason="optax is installed in the jax tox env")
    import jax.numpy as jnp
    from driftloss.adapters.jax import drifting_loss

    key = jax.random.PRNGKey(0)
    params = {"w": jnp.eye(2) * 0.1, "b": jnp.zeros(2)}
    z = jax.random.normal(key, (128, 2))
    real = jax.random.normal(jax.random.PRNGKey(1), (256, 2)) + jnp.array([3.0, -2.0])
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss_fn(p):
            return drifting_loss(z @ p["w"] + p["b"], real)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    start = np.linalg.norm(np.asarray(params["b"]) - np.array([3.0, -2.0]))
    for _ in range(150):
        params, state, _ = step(params, state)
    end = np.linalg.norm(np.asarray(params["b"]) - np.array([3.0, -2.0]))
    assert end < 0.1 * start
