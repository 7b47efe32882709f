"""The loss with its defaults learns a 2-D target: energy distance falls by 10x from the start."""

import numpy as np
import pytest
from backends import B

import driftloss

CENTRES = np.array([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]])


def sample_target(rng, n):
    return CENTRES[rng.integers(0, 4, n)] + 0.3 * rng.normal(size=(n, 2))


def energy_distance(a, b):
    def mean_dist(u, v):
        return np.linalg.norm(u[:, None] - v[None], axis=-1).mean()

    return 2 * mean_dist(a, b) - mean_dist(a, a) - mean_dist(b, b)


def test_particles_follow_the_drift_to_the_target():
    # A perfect generator: each sample moves onto its regression target x + s V (all backends).
    rng = np.random.default_rng(0)
    x = 0.1 * rng.normal(size=(256, 2)) + 5.0
    held_out = sample_target(rng, 1000)
    start = energy_distance(x, held_out)
    for _ in range(150):
        v, stats = driftloss.drift_field(B.asarray(x), B.asarray(sample_target(rng, 256)), None,
                                         driftloss.DEFAULT_TAUS, normalize=True, return_stats=True)
        s = float(B.to_numpy(stats["feature_scale"]))
        x = x + 0.05 * s * B.to_numpy(v)
    end = energy_distance(x, held_out)
    assert end < start / 10, (start, end)


def test_mlp_generator_learns_the_target():
    if B.name == "torch":
        losses, start, end = _train_torch()
    elif B.name == "jax":
        losses, start, end = _train_jax()
    else:
        pytest.skip(f"{B.name} has no autodiff to train a network (the particle test covers it)")
    assert np.all(np.isfinite(losses))
    assert end < start / 10, (start, end)


def _train_torch(steps=400):
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(8, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(),
                        nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    held_out = sample_target(rng, 1000)

    def sample(n):
        with torch.no_grad():
            return net(torch.randn(n, 8)).numpy()

    start = energy_distance(sample(1000), held_out)
    losses = []
    for _ in range(steps):
        real = torch.from_numpy(sample_target(rng, 256)).float()
        loss = driftloss.drifting_loss(net(torch.randn(256, 8)), real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses), start, energy_distance(sample(1000), held_out)


def _train_jax(steps=400):
    import jax
    import jax.numpy as jnp
    optax = pytest.importorskip("optax", reason="optax is installed in the jax tox env")

    from driftloss.adapters.jax import drifting_loss

    rng = np.random.default_rng(0)
    sizes = [8, 64, 64, 64, 2]
    keys = jax.random.split(jax.random.PRNGKey(0), len(sizes))
    params = [(jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
              for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

    def net(params, z):
        for w, b in params[:-1]:
            z = jax.nn.silu(z @ w + b)
        w, b = params[-1]
        return z @ w + b

    opt = optax.adam(2e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state, z, real):
        loss, grads = jax.value_and_grad(lambda p: drifting_loss(net(p, z), real))(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    held_out = sample_target(rng, 1000)
    key = jax.random.PRNGKey(1)
    start = energy_distance(np.asarray(net(params, jax.random.normal(key, (1000, 8)))), held_out)
    losses = []
    for i in range(steps):
        z = jax.random.normal(jax.random.fold_in(key, i + 1), (256, 8), dtype=jnp.float32)
        params, state, loss = step(params, state, z, jnp.asarray(sample_target(rng, 256), jnp.float32))
        losses.append(float(loss))
    end = energy_distance(np.asarray(net(params, jax.random.normal(key, (1000, 8)))), held_out)
    return np.array(losses), start, end
