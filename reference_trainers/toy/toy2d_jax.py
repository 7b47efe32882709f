"""Toy 2-D drifting with JAX (equinox MLP + optax Adam), the same run as reference_trainers.toy.toy2d.

    python -m reference_trainers.toy.toy2d_jax                      # 8 Gaussians from a collapsed start
    python -m reference_trainers.toy.toy2d_jax --resume runs/toy2d_jax/checkpoint.pkl --steps 3000

Same config, data stream (toy_data.step_batch), initialization rule, EMA, metrics and figures as the
torch trainer; the loss is driftloss.adapters.jax.drifting_loss inside one jitted train step. The
network's random initial weights differ from torch's (different RNGs), so the two runs agree within
seed-to-seed noise, not bit for bit.
"""

from __future__ import annotations

import os
import pickle
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=2")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from driftloss.adapters.jax import drift_field, drifting_loss  # noqa: E402

from reference_trainers.common.config_cli import config_with_resume  # noqa: E402
from reference_trainers.toy.config import ToyConfig, build_parser, learning_rate  # noqa: E402
from reference_trainers.toy.data import initial_output, make_target, step_batch  # noqa: E402
from reference_trainers.toy.run import (  # noqa: E402
    ProgressLog,
    ToyRun,
    final_metrics,
    quiver_step,
    run_all,
    snapshot_steps,
)


def _hidden(model: eqx.nn.MLP, z: jax.Array) -> jax.Array:
    """Features [hidden] before the last layer, for one noise vector z [noise_dim]."""
    for layer in model.layers[:-1]:
        z = model.activation(layer(z))
    return z


def make_generator(cfg: ToyConfig) -> eqx.nn.MLP:
    """noise [noise_dim] -> 3 hidden SiLU layers of width cfg.hidden -> sample [2] (vmap for a batch),
    with the last layer placed per cfg.init exactly as in the torch trainer (toy_data.initial_output)."""
    key = jax.random.PRNGKey(cfg.seed)
    model = eqx.nn.MLP(cfg.noise_dim, 2, cfg.hidden, 3, activation=jax.nn.silu, key=key)
    centre, spread = initial_output(make_target(cfg.target), cfg.init)
    probe = np.random.default_rng([cfg.seed, 2**60]).standard_normal((4096, cfg.noise_dim)).astype(np.float32)
    features = jax.vmap(lambda z: _hidden(model, z))(probe)          # [4096, hidden]
    last = model.layers[-1]
    weight = last.weight * (spread / (features @ last.weight.T).std(axis=0).mean())
    bias = jnp.asarray(centre, jnp.float32) - (features @ weight.T).mean(axis=0)
    return eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), model, (weight, bias))


def generate(model: eqx.nn.MLP, noise: np.ndarray) -> np.ndarray:
    """samples [n, 2] from noise [n, noise_dim]."""
    return np.asarray(jax.vmap(model)(jnp.asarray(noise)))


def make_train_step(cfg: ToyConfig, opt: optax.GradientTransformation):
    """Jitted step: (model, ema, opt_state, noise [N, nd], pos [P, 2], lr) -> (model, ema, opt_state,
    loss, stats, x [N, 2]).

    ``opt`` is Adam's scaling without the learning rate (optax.scale_by_adam); the step multiplies by
    -lr itself, so the schedule stays a plain function of the step, as in the torch trainer.
    """

    @eqx.filter_jit
    def train_step(model, ema, opt_state, noise, pos, lr):
        def loss_fn(m):
            x = jax.vmap(m)(noise)                                     # [N, 2]
            loss, stats = drifting_loss(x, pos, taus=cfg.taus, return_stats=True, **cfg.loss_options())
            return loss, (stats, x)

        (loss, (stats, x)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, jax.tree.map(lambda u: -lr * u, updates))
        # explicit EMA, the same formula as torch's lerp: ema + (1 - decay) * (model - ema)
        ema = jax.tree.map(lambda e, p: e + (1.0 - cfg.ema_decay) * (p - e) if eqx.is_array(e) else e,
                           ema, model)
        return model, ema, opt_state, loss, stats, x

    return train_step


def drift_parts(x: jax.Array, pos: jax.Array, cfg: ToyConfig, scale: float):
    """(V+, V-) [N, 2], unnormalized and summed over taus at temperature S * tau (see toy2d.drift_parts)."""
    taus = tuple(scale * t for t in cfg.taus)
    v_plus = drift_field(x, pos, tau=taus, repulsion=0.0, normalize=False, kernel=cfg.kernel)
    v_minus = -drift_field(x, pos, tau=taus, attraction=0.0, normalize=False, kernel=cfg.kernel)
    return np.asarray(v_plus), np.asarray(v_minus)


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def _restore(template, leaves: list[np.ndarray]):
    """template with its array leaves replaced by ``leaves`` (same order as _leaves)."""
    arrays, static = eqx.partition(template, eqx.is_array)
    treedef = jax.tree.structure(arrays)
    return eqx.combine(jax.tree.unflatten(treedef, [jnp.asarray(a) for a in leaves]), static)


def save_checkpoint(path: str, model, ema, opt_state, step: int, cfg: ToyConfig, run: ToyRun) -> None:
    """{model, ema, opt, step, config} (+ history) with arrays as NumPy, in a pickle."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"model": _leaves(model), "ema": _leaves(ema), "opt": _leaves(opt_state), "step": step,
                     "config": cfg.__dict__.copy(), "history": run.__dict__.copy()}, f)


def train(cfg: ToyConfig) -> tuple[ToyRun, eqx.nn.MLP, eqx.nn.MLP]:
    """Train one (target, init); resume from cfg.resume if set. Returns (run record, model, ema)."""
    target = make_target(cfg.target)
    model = make_generator(cfg)
    ema = model
    opt = optax.scale_by_adam()
    opt_state = opt.init(eqx.filter(model, eqx.is_array))
    run, start = ToyRun(), 0
    if cfg.resume:
        ckpt = _load_pickle(cfg.resume)
        model, ema = _restore(model, ckpt["model"]), _restore(ema, ckpt["ema"])
        opt_state = _restore(opt_state, ckpt["opt"])
        run, start = ToyRun(**ckpt["history"]), ckpt["step"]
    train_step = make_train_step(cfg, opt)

    keep = set(snapshot_steps(cfg))
    eval_noise = np.random.default_rng([cfg.seed, 2**59]).standard_normal((1000, cfg.noise_dim))
    eval_noise = eval_noise.astype(np.float32)                        # [1000, noise_dim], for the snapshots
    if start == 0:
        run.snapshots.append((0, generate(ema, eval_noise)))
    last = cfg.stop_at or cfg.steps
    log = ProgressLog(cfg, start, last, f"{cfg.target}/{cfg.init} (jax)")
    for step in log:
        noise, real = step_batch(target, cfg.seed, step, cfg.n_gen, cfg.n_pos, cfg.noise_dim)
        model, ema, opt_state, loss, stats, x = train_step(model, ema, opt_state, jnp.asarray(noise),
                                               jnp.asarray(real), jnp.float32(learning_rate(cfg, step)))
        run.loss.append(float(loss))
        run.energy_distance.append(float(stats["energy_distance"]))
        run.drift_rms.append(np.asarray(stats["drift_rms"]).tolist())
        run.neighbours.append(np.asarray(stats["neighbours"]).tolist())
        if step == quiver_step(cfg):
            run.quiver = (step, np.asarray(x), *drift_parts(x, jnp.asarray(real), cfg, float(stats["scale"])),
                          real)
        if step in keep:
            run.snapshots.append((step, generate(ema, eval_noise)))
        log.after_step(run, step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(os.path.join(cfg.out, "checkpoint.pkl"), model, ema, opt_state, step, cfg, run)
    save_checkpoint(os.path.join(cfg.out, "checkpoint.pkl"), model, ema, opt_state, last, cfg, run)

    run.metrics = final_metrics(cfg, lambda z: generate(ema, z), lambda z: generate(model, z))
    return run, model, ema


def _load_pickle(path: str) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def main(argv: list[str] | None = None) -> dict:
    given = vars(build_parser(__doc__.split("\n")[0]).parse_args(argv))
    if not given.get("resume"):
        given.setdefault("out", "runs/toy2d_jax")
    cfg = config_with_resume(ToyConfig, given, lambda path: _load_pickle(path)["config"])
    return run_all(cfg, lambda c: train(c)[0], framework="jax")


if __name__ == "__main__":
    main(sys.argv[1:])
