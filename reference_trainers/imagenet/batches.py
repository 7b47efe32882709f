"""The real samples of each training step: N_c classes, N_pos positives of each, N_unc unconditional samples.

    source = make_source("queue", dataset, preset, seed=0, rank=rank, world_size=world_size)
    classes, positives, uncond = source.next_batch(step)   # [N_c], [N_c, N_pos, ...], [N_c, N_unc, ...]
    state = source.state_dict()              # per rank; load_state_dict(state) resumes it exactly

"queue" is QueueSource (the A.8 sample queue, the default; it pre-fills its queues before its first batch),
"direct" is ClassBalancedSampler (the "direct loader": class-balanced draws straight from the dataset).

``dataset`` is any object with ``labels`` (int64 ``[N]``) and ``__getitem__(i) -> (tensor, label)``
(reference_trainers/imagenet/data.py's ``LatentDataset``); if it has ``item(i, generator) -> (tensor, label)``
(data.py's random flip and crop drawn from ``generator``) items are read through it with a generator seeded by
(seed, rank, step), so even the augmentation of a batch is reproduced exactly on resume; if it has
``gather(indices, generator) -> tensor [k, ...]`` that fetches all the items of a call at once instead. Every
call returns CPU tensors; the trainer moves them.

Each rank draws its own ``n_classes`` classes per step, by default ``preset.n_classes // world_size`` (the
global batch holds N_c classes; ranks draw independently, so two ranks may draw the same class in a step),
from generators seeded by (seed, rank, step): the batches depend on nothing else, so a resumed run (and a
rerun) sees the same batches.

The sample queue (paper A.8, docs/imagenet_recipe.md): each rank keeps a FIFO queue of the newest
``queue_per_class`` (128) real samples of every class and a global FIFO of the newest ``queue_uncond`` (1000)
samples of any class. Every step pushes the next ``queue_push`` samples of the rank's data stream (a seeded
shuffle of the dataset, reshuffled each epoch, rank r taking positions r, r + W, r + 2W, ... of it), then
draws the step's classes among the classes whose queue is non-empty, N_pos positives of each from its class
queue and N_unc unconditional samples per class from the global queue. Draws are WITHOUT replacement from a
queue that holds at least the number asked for (the paper), and WITH replacement from what it holds while it
still holds fewer (the authors' release does that while the queues fill); asking for a class whose queue is
empty is an error. "Without replacement" is over queue slots: a queue can hold one dataset item twice when the
stream pushed it in two epochs (as a queue of samples would). ``prefill`` pushes before training until every
class of the dataset holds at least N_pos samples (or up to one pass over the rank's stream), so training
starts on full-size draws. Each rank's queues see only its 1/W of the stream: with ImageNet on 8 ranks a class
brings 90-160 samples per epoch to a rank, so a small class's queue is still filling (drawn with replacement
when N_pos = 128) until its second epoch on that rank.

The queues hold dataset INDICES, not the samples: an item is read from the dataset when it is drawn. This is
the same data as storing the samples when ``__getitem__`` is deterministic, keeps the queues small (8 bytes a
sample instead of 16 KiB for a [4, 32, 32] float32 latent, 1 MB per rank for ImageNet) so that the state_dict
can go into every checkpoint, and prefilling reads no data. A dataset that draws a random flip per read gets
a fresh flip each time an item is drawn (from the step's generator when the dataset has ``item``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

_SAMPLER, _QUEUE_DRAW, _STREAM, _ITEMS = 1, 2, 3, 4   # generator tags: independent streams per purpose
SOURCES = ("queue", "direct")


class StepBatch(NamedTuple):
    classes: torch.Tensor        # int64 [N_c]
    positives: torch.Tensor      # [N_c, N_pos, ...]: samples of class classes[i]
    uncond: torch.Tensor         # [N_c, N_unc, ...]: samples of any class


def make_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from the non-negative integers ``keys`` (via NumPy's SeedSequence)."""
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"seed keys must be >= 0; got {keys}")
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def choice(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` indices in ``[0, n)``: without replacement when ``n >= k``, with replacement otherwise."""
    if n <= 0:
        raise ValueError("cannot draw from an empty set")
    if n < k:
        return torch.randint(n, (k,), generator=generator)
    if n <= 8 * k + 1024:
        return torch.randperm(n, generator=generator)[:k]
    picked: dict[int, None] = {}                  # large n, small k: rejection keeps it O(k), not O(n)
    while len(picked) < k:
        for i in torch.randint(n, (2 * k,), generator=generator).tolist():
            if len(picked) == k:
                break
            picked.setdefault(i)
    return torch.tensor(list(picked), dtype=torch.int64)


def classes_per_rank(preset: Any, world_size: int, n_classes: int | None = None) -> int:
    """The classes each rank draws per step: ``n_classes`` if given, else N_c / world_size."""
    if n_classes is not None:
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1; got {n_classes}")
        return n_classes
    if world_size < 1 or preset.n_classes % world_size:
        raise ValueError(f"the preset's N_c = {preset.n_classes} classes per step do not split evenly over "
                         f"{world_size} ranks; give n_classes (classes per rank) explicitly")
    return preset.n_classes // world_size


def _labels_of(dataset: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(dataset.labels)
    if labels.ndim != 1 or len(labels) == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"dataset.labels must be a non-empty 1-D integer array; got {labels.dtype} "
                         f"{labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"dataset labels must lie in [0, {num_classes}); "
                         f"got [{labels.min()}, {labels.max()}]")
    return labels.astype(np.int64, copy=False)


def gather(dataset: Any, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The dataset items at ``indices`` (any shape) stacked as ``[*indices.shape, ...]`` on the CPU: by
    ``dataset.gather(indices, generator)`` if it has one, else ``dataset.item(i, generator)`` when a generator
    is given and the dataset has it, else ``dataset[i]``."""
    flat = indices.reshape(-1)
    if hasattr(dataset, "gather"):
        items = torch.as_tensor(dataset.gather(flat, generator))
    elif generator is not None and hasattr(dataset, "item"):
        items = torch.stack([torch.as_tensor(dataset.item(i, generator)[0]) for i in flat.tolist()])
    else:
        items = torch.stack([torch.as_tensor(dataset[i][0]) for i in flat.tolist()])
    return items.reshape(*indices.shape, *items.shape[1:])


def _draw_classes(candidates: torch.Tensor, n: int, generator: torch.Generator, what: str) -> torch.Tensor:
    if len(candidates) < n:
        raise ValueError(f"{n} classes are drawn per step but only {len(candidates)} {what}")
    return candidates[torch.randperm(len(candidates), generator=generator)[:n]]


# --------------------------------------------------------------------------------------------------------
# the direct loader
# --------------------------------------------------------------------------------------------------------

class ClassBalancedSampler:
    """Each step: ``n_classes`` distinct classes drawn uniformly among those the dataset holds, N_pos samples
    of each (without replacement; with replacement for a class with fewer than N_pos samples) and N_unc
    samples of the whole dataset per class (without replacement within a class's row).

    ``batch(step)`` depends only on (seed, rank, step); ``next_batch()`` walks the steps from
    ``state_dict()["step"]``.
    """

    def __init__(self, dataset: Any, preset: Any, seed: int = 0, rank: int = 0, world_size: int = 1,
                 n_classes: int | None = None):
        self.dataset, self.seed, self.rank = dataset, seed, rank
        self.n_classes = classes_per_rank(preset, world_size, n_classes)
        self.n_pos, self.n_unc = preset.n_pos, preset.n_unc
        self.labels = _labels_of(dataset, preset.num_classes)
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels, minlength=preset.num_classes)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._order, self._counts, self._starts = torch.from_numpy(order), counts, starts
        self.present = torch.from_numpy(np.flatnonzero(counts)).to(torch.int64)
        if len(self.present) < self.n_classes:
            raise ValueError(f"{self.n_classes} classes are drawn per step but only {len(self.present)} "
                             "classes have samples in the dataset")
        self.step = 0

    def indices(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(classes [N_c], positive indices [N_c, N_pos], unconditional indices [N_c, N_unc]) of ``step``."""
        g = make_generator(self.seed, self.rank, step, _SAMPLER)
        classes = _draw_classes(self.present, self.n_classes, g, "classes have samples in the dataset")
        pos = torch.stack([self._order[int(self._starts[c]) + choice(int(self._counts[c]), self.n_pos, g)]
                           for c in classes.tolist()])
        unc = torch.stack([choice(len(self.labels), self.n_unc, g) for _ in range(self.n_classes)])
        return classes, pos, unc

    def batch(self, step: int) -> StepBatch:
        classes, pos, unc = self.indices(step)
        g = make_generator(self.seed, self.rank, step, _ITEMS)
        return StepBatch(classes, gather(self.dataset, pos, g), gather(self.dataset, unc, g))

    def next_batch(self, step: int | None = None) -> StepBatch:
        """The batch of ``step`` (default: the step after the previous call's)."""
        step = self.step if step is None else step
        out = self.batch(step)
        self.step = step + 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


# --------------------------------------------------------------------------------------------------------
# the sample queue (A.8)
# --------------------------------------------------------------------------------------------------------

class SampleQueue:
    """Per-class FIFO queues of ``per_class`` samples and a global FIFO of ``uncond`` samples (any class).

    ``push(samples [n, ...], labels [n])`` appends in order, the oldest falling out of a full queue;
    ``sample`` draws without replacement from a queue holding at least the number asked for and with
    replacement from what it holds otherwise; a class with an empty queue is an error. Samples can be any
    tensors of one shape and dtype (QueueSource pushes dataset indices). Storage is allocated on the first
    push: ``num_classes * per_class`` items.
    """

    def __init__(self, num_classes: int, per_class: int, uncond: int):
        if min(num_classes, per_class, uncond) < 1:
            raise ValueError("num_classes, per_class and uncond must be >= 1")
        self.num_classes, self.per_class, self.uncond = num_classes, per_class, uncond
        self._data: torch.Tensor | None = None              # [num_classes, per_class, ...]
        self._u_data: torch.Tensor | None = None            # [uncond, ...]
        self._u_labels = torch.zeros(uncond, dtype=torch.int64)
        self._count = torch.zeros(num_classes, dtype=torch.int64)
        self._head = torch.zeros(num_classes, dtype=torch.int64)   # next slot written
        self._u_count, self._u_head = 0, 0

    # --- writing -------------------------------------------------------------------------------------------
    def push(self, samples: torch.Tensor, labels: torch.Tensor) -> None:
        samples, labels = torch.as_tensor(samples), torch.as_tensor(labels).to(torch.int64).reshape(-1)
        if samples.ndim == 0 or len(samples) != len(labels):
            raise ValueError(f"push needs samples [n, ...] and labels [n]; got {tuple(samples.shape)} and "
                             f"{tuple(labels.shape)}")
        if len(labels) == 0:
            return
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        if self._data is None:
            shape = tuple(samples.shape[1:])
            self._data = torch.zeros((self.num_classes, self.per_class, *shape), dtype=samples.dtype)
            self._u_data = torch.zeros((self.uncond, *shape), dtype=samples.dtype)
        elif samples.shape[1:] != self._data.shape[2:] or samples.dtype != self._data.dtype:
            raise ValueError(f"samples {tuple(samples.shape[1:])} {samples.dtype} do not match the queue's "
                             f"{tuple(self._data.shape[2:])} {self._data.dtype}")
        self._u_head, self._u_count = self._write(self._u_data, self._u_head, self._u_count, samples,
                                                  self._u_labels, labels)
        for c in torch.unique(labels).tolist():
            mask = labels == c
            head, count = self._write(self._data[c], int(self._head[c]), int(self._count[c]), samples[mask])
            self._head[c], self._count[c] = head, count

    @staticmethod
    def _write(ring: torch.Tensor, head: int, count: int, items: torch.Tensor,
               ring_labels: torch.Tensor | None = None, labels: torch.Tensor | None = None
               ) -> tuple[int, int]:
        cap, n = len(ring), len(items)
        keep = min(n, cap)                                 # only the newest `cap` of a long push survive
        slots = (head + (n - keep) + torch.arange(keep)) % cap
        ring[slots] = items[n - keep:]
        if ring_labels is not None:
            ring_labels[slots] = labels[n - keep:]
        return (head + n) % cap, min(count + n, cap)

    # --- reading -------------------------------------------------------------------------------------------
    def counts(self) -> torch.Tensor:
        """Samples held per class, int64 [num_classes]."""
        return self._count.clone()

    @property
    def uncond_count(self) -> int:
        return self._u_count

    def contents(self, label: int | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The samples of class ``label``'s queue, oldest first; with ``label=None`` the global queue's
        (samples, labels), oldest first."""
        if label is None:
            if self._u_data is None:
                return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
            order = self._fifo_order(self._u_head, self._u_count, self.uncond)
            return self._u_data[order], self._u_labels[order]
        if self._data is None:
            return torch.zeros(0)
        return self._data[label][self._fifo_order(int(self._head[label]), int(self._count[label]),
                                                  self.per_class)]

    @staticmethod
    def _fifo_order(head: int, count: int, cap: int) -> torch.Tensor:
        return (head - count + torch.arange(count)) % cap

    def sample(self, classes: torch.Tensor, n_pos: int, n_unc: int, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positives [N_c, n_pos, ...] from each class's queue, unconditional [N_c, n_unc, ...] from the
        global queue, their labels int64 [N_c, n_unc]); draws in the order of ``classes``."""
        classes = torch.as_tensor(classes).to(torch.int64).reshape(-1)
        empty = [c for c in classes.tolist() if self._count[c] == 0]
        if empty:
            raise ValueError(f"the queues of classes {empty[:10]} are empty: push (pre-fill) samples of "
                             "every class drawn before sampling")
        if self._u_count == 0:
            raise ValueError("the unconditional queue is empty: push samples before sampling")
        pos, unc, unc_labels = [], [], []
        for c in classes.tolist():
            # the held slots: 0..count-1 while filling (written from slot 0), all of them once full
            pos.append(self._data[c][choice(int(self._count[c]), n_pos, generator)])
        for _ in range(len(classes)):
            slots = choice(self._u_count, n_unc, generator)
            unc.append(self._u_data[slots])
            unc_labels.append(self._u_labels[slots])
        return torch.stack(pos), torch.stack(unc), torch.stack(unc_labels)

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"num_classes": self.num_classes, "per_class": self.per_class, "uncond": self.uncond,
                "data": None if self._data is None else self._data.clone(),
                "count": self._count.clone(), "head": self._head.clone(),
                "u_data": None if self._u_data is None else self._u_data.clone(),
                "u_labels": self._u_labels.clone(), "u_count": self._u_count, "u_head": self._u_head}

    def load_state_dict(self, state: dict) -> None:
        sizes = (state["num_classes"], state["per_class"], state["uncond"])
        if sizes != (self.num_classes, self.per_class, self.uncond):
            raise ValueError(f"queue state of (classes, per class, uncond) = {sizes} does not fit this "
                             f"queue's {(self.num_classes, self.per_class, self.uncond)}")
        self._data = None if state["data"] is None else state["data"].clone()
        self._u_data = None if state["u_data"] is None else state["u_data"].clone()
        self._count, self._head = state["count"].clone(), state["head"].clone()
        self._u_labels = state["u_labels"].clone()
        self._u_count, self._u_head = int(state["u_count"]), int(state["u_head"])


class QueueSource:
    """The default batch source (A.8): a rank's data stream feeding a SampleQueue; see the module docstring.

    ``next_batch(step)`` pushes the next ``preset.queue_push`` stream samples, then draws the step's batch;
    the first call pre-fills the queues (``prefill()``) unless that was done, ``auto_prefill`` is False or a
    state was loaded. ``state_dict()`` holds the step, the stream position and the queue (indices, about
    1 MB per rank for ImageNet), all a resume needs.
    """

    def __init__(self, dataset: Any, preset: Any, seed: int = 0, rank: int = 0, world_size: int = 1,
                 n_classes: int | None = None, auto_prefill: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size); got rank {rank}, world_size {world_size}")
        self.dataset, self.seed, self.rank, self.world_size = dataset, seed, rank, world_size
        self.n_classes = classes_per_rank(preset, world_size, n_classes)
        self.n_pos, self.n_unc, self.push_size = preset.n_pos, preset.n_unc, preset.queue_push
        self.labels = _labels_of(dataset, preset.num_classes)
        self._labels_t = torch.from_numpy(self.labels)
        if len(self.labels) < world_size:
            raise ValueError(f"{len(self.labels)} samples cannot be split over {world_size} ranks")
        self.queue = SampleQueue(preset.num_classes, preset.queue_per_class, preset.queue_uncond)
        self.step, self.epoch, self.offset = 0, 0, 0
        self.auto_prefill, self.prefilled = auto_prefill, False
        self._shard_epoch, self._shard = -1, torch.zeros(0, dtype=torch.int64)

    # --- the stream ----------------------------------------------------------------------------------------
    def stream_indices(self, epoch: int) -> torch.Tensor:
        """This rank's order of dataset indices in ``epoch``: positions rank, rank + W, ... of a shuffle of
        the dataset seeded by (seed, epoch), the same shuffle on every rank."""
        if epoch != self._shard_epoch:
            perm = torch.randperm(len(self.labels), generator=make_generator(self.seed, epoch, _STREAM))
            self._shard_epoch, self._shard = epoch, perm[self.rank::self.world_size]
        return self._shard

    def _pull(self, n: int) -> torch.Tensor:
        parts = []
        while n > 0:
            shard = self.stream_indices(self.epoch)
            take = shard[self.offset:self.offset + n]
            parts.append(take)
            n -= len(take)
            self.offset += len(take)
            if self.offset >= len(shard):
                self.epoch, self.offset = self.epoch + 1, 0
        return torch.cat(parts)

    def push_next(self) -> torch.Tensor:
        """Push the next ``queue_push`` samples of the stream; returns their dataset indices."""
        idx = self._pull(self.push_size)
        self.queue.push(idx, self._labels_t[idx])
        return idx

    def prefill(self, min_count: int | None = None, max_pushes: int | None = None) -> int:
        """Push until every class of the dataset holds at least ``min(min_count, queue_per_class)`` samples
        (``min_count`` defaults to N_pos) and the global queue is full, or ``max_pushes`` pushes were made
        (default: one pass over this rank's stream). Returns the number of pushes."""
        want = min(self.n_pos if min_count is None else min_count, self.queue.per_class)
        if max_pushes is None:
            max_pushes = -(-len(self.stream_indices(self.epoch)) // self.push_size)
        present = torch.from_numpy(np.flatnonzero(np.bincount(self.labels, minlength=self.queue.num_classes)))
        pushes = 0
        while pushes < max_pushes and (self.queue.uncond_count < self.queue.uncond
                                       or bool((self.queue.counts()[present] < want).any())):
            self.push_next()
            pushes += 1
        self.prefilled = True
        return pushes

    # --- the batches ---------------------------------------------------------------------------------------
    def next_indices(self, step: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Push, then draw the batch of ``step`` (default: the step after the previous call's) as dataset
        indices: (classes [N_c], positives [N_c, N_pos], unconditional [N_c, N_unc])."""
        if self.auto_prefill and not self.prefilled:
            self.prefill()
        step = self.step if step is None else step
        self.push_next()
        g = make_generator(self.seed, self.rank, step, _QUEUE_DRAW)
        nonempty = torch.nonzero(self.queue.counts() > 0).reshape(-1)
        classes = _draw_classes(nonempty, self.n_classes, g,
                                "classes have samples in the queue (call prefill() before training)")
        pos, unc, _ = self.queue.sample(classes, self.n_pos, self.n_unc, g)
        self.step = step + 1
        return classes, pos, unc

    def next_batch(self, step: int | None = None) -> StepBatch:
        """The batch of ``step`` (default: the step after the previous call's), read from the dataset."""
        step = self.step if step is None else step
        classes, pos, unc = self.next_indices(step)
        g = make_generator(self.seed, self.rank, step, _ITEMS)
        return StepBatch(classes, gather(self.dataset, pos, g), gather(self.dataset, unc, g))

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "offset": self.offset, "prefilled": self.prefilled,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_samples": len(self.labels), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_samples": len(self.labels)}
        diff = {k: (state[k], v) for k, v in mine.items() if state[k] != v}
        if diff:
            raise ValueError("this QueueSource state belongs to another stream "
                             + ", ".join(f"{k}: {a} saved, {b} now" for k, (a, b) in diff.items())
                             + "; each rank must load its own state, with the same seed, world size and data")
        self.queue.load_state_dict(state["queue"])
        self.step, self.epoch, self.offset = int(state["step"]), int(state["epoch"]), int(state["offset"])
        self.prefilled = True                      # a saved source is past its pre-fill


def make_source(kind: str, dataset: Any, preset: Any, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                classes_per_step: int | None = None) -> QueueSource | ClassBalancedSampler:
    """The trainer's batch source: "queue" (QueueSource, A.8, the default) or "direct"
    (ClassBalancedSampler); ``classes_per_step``: classes this rank draws per step (default N_c / W)."""
    if kind == "queue":
        return QueueSource(dataset, preset, seed, rank, world_size, n_classes=classes_per_step)
    if kind == "direct":
        return ClassBalancedSampler(dataset, preset, seed, rank, world_size, n_classes=classes_per_step)
    raise ValueError(f"unknown batch source {kind!r}; choose one of {', '.join(SOURCES)}")
