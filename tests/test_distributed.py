"""Data parallel: R replicas holding some of the problems each compute the single-device loss.

torch: 2 CPU processes over gloo (loopback). JAX: shard_map over 2 host devices (tests/backends.py).
"""

import os
import socket

import numpy as np
import pytest
from backends import B
from reference_loss import reference_loss_and_grad

import driftloss

G, N, P, M, D = 4, 6, 8, 3, 5  # 4 problems (e.g. classes), split 2 + 2 over the replicas
rng = np.random.default_rng(0)
X = rng.normal(size=(G, N, D)).astype(np.float32)
POS = (rng.normal(size=(G, P, D)) + 0.5).astype(np.float32)
NEG = rng.normal(size=(G, M, D)).astype(np.float32)
W = rng.uniform(size=(G, M)).astype(np.float32)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torch_worker(rank, world, port, out_dir, explicit_group):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        part = slice(rank * G // world, (rank + 1) * G // world)
        x = torch.from_numpy(X[part]).requires_grad_(True)
        args = (torch.from_numpy(POS[part]), torch.from_numpy(NEG[part]))
        if explicit_group:
            from driftloss.adapters.torch import drifting_loss

            loss = drifting_loss(x, *args, neg_weight=torch.from_numpy(W[part]),
                                 process_group=dist.new_group([0, 1]))
        else:  # torch.distributed is initialized: the all-reduce is automatic
            loss = driftloss.drifting_loss(x, *args, neg_weight=torch.from_numpy(W[part]))
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": x.grad, "start": part.start, "stop": part.stop},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("explicit_group", [False, True])
def test_torch_two_processes_equal_single_process(tmp_path, explicit_group):
    if B.name != "torch":
        pytest.skip("torch.distributed runs in the torch env")
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_torch_worker, args=(2, _free_port(), str(tmp_path), explicit_group), nprocs=2, join=True)
    want_loss, want_grad = reference_loss_and_grad(X, POS, NEG, neg_weight=W)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # DDP averages over replicas: mean of the local losses and gradients / R are the single-device ones.
    loss = np.mean([r["loss"].item() for r in results])
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    for r in results:
        np.testing.assert_allclose(r["grad"].numpy() / 2, want_grad[r["start"]:r["stop"]], rtol=1e-4,
                                   atol=1e-5 * np.abs(want_grad).max())
    # Without the all-reduce the local statistics differ: the test above can fail.
    local = np.mean([reference_loss_and_grad(X[p], POS[p], NEG[p], neg_weight=W[p])[0]
                     for p in (slice(0, 2), slice(2, 4))])
    assert abs(local - want_loss) > 1e-4 * want_loss


def test_jax_shard_map_equals_single_device():
    if B.name != "jax":
        pytest.skip("shard_map runs in the jax env")
    import jax
    import jax.numpy as jnp
    from driftloss.adapters.jax import drifting_loss
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as Spec

    assert len(jax.devices()) >= 2, "tests/backends.py asks XLA for 2 host devices"
    shard_map = getattr(jax, "shard_map", None)
    if shard_map is None:
        from jax.experimental.shard_map import shard_map
    mesh = jax.make_mesh((2,), ("r",))

    def per_replica(x, p, q, w):
        return drifting_loss(x, p, q, neg_weight=w, axis_name="r")[None]  # [1] per replica

    sharded = shard_map(per_replica, mesh=mesh, in_specs=(Spec("r"),) * 4, out_specs=Spec("r"))
    args = [jax.device_put(a, NamedSharding(mesh, Spec("r"))) for a in (X, POS, NEG, W)]

    def total(x, p, q, w):
        return jnp.mean(sharded(x, p, q, w))

    want_loss, want_grad = reference_loss_and_grad(X, POS, NEG, neg_weight=W)
    assert abs(float(jax.jit(total)(*args)) - want_loss) <= 1e-5 * want_loss
    g = np.asarray(jax.jit(jax.grad(total))(*args))
    np.testing.assert_allclose(g, want_grad, rtol=1e-4, atol=1e-5 * np.abs(want_grad).max())
    # Globally sharded arrays under plain jit need nothing: the arrays are global.
    single = jax.jit(lambda x, p, q, w: drifting_loss(x, p, q, neg_weight=w))(*args)
    assert abs(float(single) - want_loss) <= 1e-5 * want_loss
