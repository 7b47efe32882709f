"""The step batches (reference_trainers/imagenet/batches.py): the class-balanced direct sampler, the A.8
sample queue and the queue-fed source, on a small in-test dataset whose items carry (index, label)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch

from reference_trainers.imagenet.batches import (
    ClassBalancedSampler,
    QueueSource,
    SampleQueue,
    StepBatch,
    choice,
    make_generator,
    make_source,
)
from reference_trainers.imagenet.presets import get_preset

SIZES = [30, 25, 3, 40, 12, 0, 20]     # class 2 has fewer than N_pos samples, class 5 none


class ToyDataset:
    """labels int64 [N] (shuffled); item i = float tensor [3, 1, 1] holding (i, label, a random draw), the
    draw made by ``item(i, generator)`` as data.py's datasets draw their flips (0 through __getitem__)."""

    def __init__(self, sizes=SIZES, seed=0):
        labels = np.concatenate([np.full(n, c, np.int64) for c, n in enumerate(sizes)])
        self.labels = np.random.default_rng(seed).permutation(labels)

    def __len__(self):
        return len(self.labels)

    def item(self, i, generator):
        r = float(torch.rand((), generator=generator))
        return torch.tensor([float(i), float(self.labels[i]), r]).view(3, 1, 1), int(self.labels[i])

    def __getitem__(self, i):
        return torch.tensor([float(i), float(self.labels[i]), 0.0]).view(3, 1, 1), int(self.labels[i])


class PlainDataset:
    """The minimal interface: labels and __getitem__ only."""

    def __init__(self):
        self._toy = ToyDataset()
        self.labels = self._toy.labels

    def __getitem__(self, i):
        return self._toy[i]


PRESET = get_preset("latent-tiny", num_classes=len(SIZES), n_classes=4, n_pos=8, n_unc=6, queue_per_class=10,
                    queue_uncond=20, queue_push=8)


def _check_batch(batch: StepBatch, ds: ToyDataset, n_classes: int, queue: SampleQueue | None = None):
    """Shapes, classes and distinct draws; with ``queue`` (the queue drawn from) draws are distinct queue
    SLOTS: an index can repeat only as often as the queue holds it (pushed again in a later epoch)."""
    assert batch.classes.dtype == torch.int64 and batch.classes.shape == (n_classes,)
    assert len(set(batch.classes.tolist())) == n_classes                 # distinct classes in a step
    assert batch.positives.shape == (n_classes, PRESET.n_pos, 3, 1, 1)
    assert batch.uncond.shape == (n_classes, PRESET.n_unc, 3, 1, 1)
    pos_idx, pos_lab = batch.positives[:, :, 0, 0, 0].long(), batch.positives[:, :, 1, 0, 0].long()
    assert torch.equal(pos_lab, batch.classes[:, None].expand_as(pos_lab))   # every positive has its class
    assert torch.equal(torch.from_numpy(ds.labels)[pos_idx], pos_lab)
    unc_idx, unc_lab = batch.uncond[:, :, 0, 0, 0].long(), batch.uncond[:, :, 1, 0, 0].long()
    assert torch.equal(torch.from_numpy(ds.labels)[unc_idx], unc_lab)
    for row, c in zip(pos_idx.tolist(), batch.classes.tolist()):
        if queue is None and SIZES[c] >= PRESET.n_pos:
            assert len(set(row)) == PRESET.n_pos                        # without replacement
        elif queue is not None and queue.counts()[c] >= PRESET.n_pos:
            held = Counter(queue.contents(c).tolist())
            assert all(n <= held[i] for i, n in Counter(row).items())
    for row in unc_idx.tolist():
        if queue is None:
            assert len(set(row)) == PRESET.n_unc
        else:
            held = Counter(queue.contents()[0].tolist())
            assert all(n <= held[i] for i, n in Counter(row).items())


def _equal(a: StepBatch, b: StepBatch) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --- the direct loader -------------------------------------------------------------------------------------

def test_sampler_class_balance_and_unconditional_spread():
    ds = ToyDataset()
    sampler = ClassBalancedSampler(ds, PRESET, seed=1)
    seen_classes, unc_classes = set(), set()
    for step in range(20):
        batch = sampler.batch(step)
        _check_batch(batch, ds, PRESET.n_classes)
        seen_classes |= set(batch.classes.tolist())
        unc_labels = batch.uncond[:, :, 1, 0, 0].long()
        unc_classes |= set(unc_labels.reshape(-1).tolist())
        assert max(len(set(r)) for r in unc_labels.tolist()) > 1              # rows mix classes
        if 2 in batch.classes.tolist():                                   # 3 samples < N_pos: replacement
            row = batch.positives[batch.classes.tolist().index(2), :, 0, 0, 0].long()
            assert set(row.tolist()) <= set(np.flatnonzero(ds.labels == 2).tolist())
    assert seen_classes == {0, 1, 2, 3, 4, 6}                              # never the empty class 5
    assert unc_classes == {0, 1, 2, 3, 4, 6}


def test_sampler_deterministic_per_seed_and_rank():
    ds = ToyDataset()
    a, b = ClassBalancedSampler(ds, PRESET, seed=1, rank=0), ClassBalancedSampler(ds, PRESET, seed=1, rank=0)
    assert all(_equal(a.next_batch(), b.next_batch()) for _ in range(3))
    assert _equal(a.batch(7), b.batch(7)) and _equal(a.batch(7), a.batch(7))   # a function of the step
    other_rank = ClassBalancedSampler(ds, PRESET, seed=1, rank=1)
    other_seed = ClassBalancedSampler(ds, PRESET, seed=2, rank=0)
    assert not _equal(a.batch(0), other_rank.batch(0)) and not _equal(a.batch(0), other_seed.batch(0))
    c = ClassBalancedSampler(ds, PRESET, seed=1)
    c.load_state_dict(a.state_dict())
    assert _equal(c.next_batch(), a.next_batch())


def test_classes_split_over_ranks_and_errors():
    ds = ToyDataset()
    assert ClassBalancedSampler(ds, PRESET, world_size=2).n_classes == 2
    assert QueueSource(ds, PRESET, rank=3, world_size=4).n_classes == 1
    with pytest.raises(ValueError, match="split evenly"):
        ClassBalancedSampler(ds, PRESET, world_size=3)
    assert ClassBalancedSampler(ds, PRESET, world_size=3, n_classes=5).n_classes == 5
    with pytest.raises(ValueError, match="only 6 classes have samples"):
        ClassBalancedSampler(ds, PRESET, n_classes=7)
    bad = ToyDataset()
    bad.labels = bad.labels + 10
    with pytest.raises(ValueError, match="labels must lie in"):
        QueueSource(bad, PRESET)


def test_choice_without_then_with_replacement():
    g = make_generator(0)
    assert sorted(choice(5, 5, g).tolist()) == [0, 1, 2, 3, 4]
    assert len(set(choice(10**7, 64, g).tolist())) == 64                  # the large-n path
    drawn = choice(3, 50, g)
    assert set(drawn.tolist()) == {0, 1, 2}


# --- the queue ---------------------------------------------------------------------------------------------

def test_queue_fifo_by_hand():
    q = SampleQueue(num_classes=3, per_class=3, uncond=4)
    q.push(torch.tensor([10, 11, 20]), torch.tensor([1, 1, 2]))
    assert q.counts().tolist() == [0, 2, 1] and q.uncond_count == 3
    assert q.contents(1).tolist() == [10, 11] and q.contents(0).tolist() == []
    q.push(torch.tensor([12, 13, 21, 14]), torch.tensor([1, 1, 2, 1]))
    assert q.contents(1).tolist() == [12, 13, 14]                         # 10, 11 fell out, oldest first
    assert q.contents(2).tolist() == [20, 21]
    samples, labels = q.contents()
    assert samples.tolist() == [12, 13, 21, 14] and labels.tolist() == [1, 1, 2, 1]   # newest 4 of 7
    q.push(torch.arange(100, 110), torch.zeros(10, dtype=torch.int64))   # one push longer than capacity
    assert q.contents(0).tolist() == [107, 108, 109]
    assert q.contents()[0].tolist() == [106, 107, 108, 109] and q.counts().tolist() == [3, 3, 2]
    with pytest.raises(ValueError, match="labels must lie"):
        q.push(torch.tensor([1]), torch.tensor([3]))
    with pytest.raises(ValueError, match="do not match"):
        q.push(torch.zeros(1, 2), torch.tensor([0]))


def test_queue_sampling_with_and_without_replacement():
    q = SampleQueue(num_classes=3, per_class=6, uncond=8)
    items = torch.arange(30).view(10, 3).float()                          # samples [n, 3]
    q.push(items[:6], torch.tensor([0, 0, 0, 0, 0, 0]))
    q.push(items[6:9], torch.tensor([1, 1, 1]))
    g = make_generator(5)
    pos, unc, unc_lab = q.sample(torch.tensor([0, 1]), 6, 8, g)
    assert pos.shape == (2, 6, 3) and unc.shape == (2, 8, 3) and unc_lab.shape == (2, 8)
    assert sorted(pos[0, :, 0].tolist()) == [0, 3, 6, 9, 12, 15]          # full queue: each sample once
    assert set(pos[1, :, 0].tolist()) <= {18, 21, 24}                     # filling: with replacement
    for row, lab in zip(unc, unc_lab):                                    # global queue full: no repeats
        assert len(set(row[:, 0].tolist())) == 8
        assert torch.equal(lab, torch.where(row[:, 0] >= 18, 1, 0))
    pos, _, _ = q.sample(torch.tensor([0]), 4, 2, g)
    assert len(set(pos[0, :, 0].tolist())) == 4
    with pytest.raises(ValueError, match="classes \\[2\\] are empty"):
        q.sample(torch.tensor([0, 2]), 2, 2, g)


def test_queue_state_dict_round_trip():
    q = SampleQueue(num_classes=3, per_class=4, uncond=5)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        q.push(torch.randn(4, 2, generator=g), torch.randint(3, (4,), generator=g))
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    r = SampleQueue(num_classes=3, per_class=4, uncond=5)
    buf.seek(0)
    r.load_state_dict(torch.load(buf))
    new = torch.randn(3, 2, generator=g), torch.tensor([0, 0, 2])
    q.push(*new)
    r.push(*new)
    for c in range(3):
        assert torch.equal(q.contents(c), r.contents(c))
    a = q.sample(torch.tensor([0, 2]), 3, 4, make_generator(1))
    b = r.sample(torch.tensor([0, 2]), 3, 4, make_generator(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError, match="does not fit"):
        SampleQueue(num_classes=3, per_class=5, uncond=5).load_state_dict(q.state_dict())


# --- the queue-fed source ----------------------------------------------------------------------------------

def test_queue_source_batches_and_prefill():
    ds = ToyDataset()
    src = QueueSource(ds, PRESET, seed=0)
    pushes = src.prefill()
    counts = src.queue.counts()
    assert pushes >= 2 and src.queue.uncond_count == PRESET.queue_uncond
    for c, n in enumerate(SIZES):                                         # >= N_pos where the data allow
        assert counts[c] >= min(n, PRESET.n_pos)
    for _ in range(5):
        _check_batch(src.next_batch(), ds, PRESET.n_classes, src.queue)
    assert src.step == 5
    newest = src.queue.contents()[0]                                      # the global queue = the newest
    stream = torch.cat([src.stream_indices(0), src.stream_indices(1)])    # stream samples, in order
    pulled = (pushes + 5) * PRESET.queue_push
    assert torch.equal(newest, stream[pulled - PRESET.queue_uncond:pulled])


def test_queue_source_streams_partition_the_data_per_rank():
    ds = ToyDataset()
    shards = [QueueSource(ds, PRESET, seed=3, rank=r, world_size=2).stream_indices(0) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(len(ds)))
    again = QueueSource(ds, PRESET, seed=3, rank=0, world_size=2)
    assert not torch.equal(again.stream_indices(0), again.stream_indices(1))   # reshuffled each epoch
    src = QueueSource(ds, PRESET, seed=3, rank=1, world_size=2)
    pulled = torch.cat([src.push_next() for _ in range(10)])             # 80 > one epoch of 65
    assert torch.equal(pulled, torch.cat([src.stream_indices(0), src.stream_indices(1)])[:80])


def test_queue_source_deterministic_per_seed_and_rank():
    ds = ToyDataset()

    def run(seed, rank):
        src = QueueSource(ds, PRESET, seed=seed, rank=rank, world_size=2, n_classes=3)
        src.prefill()
        return [src.next_batch() for _ in range(3)]

    first = run(0, 0)
    assert all(_equal(x, y) for x, y in zip(first, run(0, 0)))
    assert not any(_equal(x, y) for x, y in zip(first, run(0, 1)))
    assert not any(_equal(x, y) for x, y in zip(first, run(1, 0)))


def test_queue_source_state_dict_resumes_exactly():
    ds = ToyDataset()
    src = QueueSource(ds, PRESET, seed=4, rank=1, world_size=2, n_classes=3)
    src.prefill(max_pushes=2)                                             # still filling: replacement path
    for _ in range(3):
        src.next_batch()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    expected = [src.next_batch() for _ in range(6)]                       # crosses an epoch boundary
    resumed = QueueSource(ds, PRESET, seed=4, rank=1, world_size=2, n_classes=3)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    assert all(_equal(x, resumed.next_batch()) for x in expected)
    assert resumed.state_dict()["epoch"] == src.state_dict()["epoch"] >= 1
    with pytest.raises(ValueError, match="rank: 1 saved, 0 now"):
        QueueSource(ds, PRESET, seed=4, rank=0, world_size=2, n_classes=3).load_state_dict(src.state_dict())


def test_queue_source_needs_enough_nonempty_classes():
    preset = get_preset("latent-tiny", num_classes=len(SIZES), n_classes=5, queue_push=1)
    src = QueueSource(ToyDataset(), preset, auto_prefill=False)
    with pytest.raises(ValueError, match="only 1 classes have samples in the queue.*prefill"):
        src.next_batch()


def test_make_source_the_trainers_interface():
    ds = ToyDataset()
    src = make_source("queue", ds, PRESET, seed=0, rank=1, world_size=2, classes_per_step=3)
    assert isinstance(src, QueueSource) and src.n_classes == 3
    classes, pos, unc = src.next_batch(1)                                 # 1-based steps; pre-fills first
    assert src.prefilled and src.queue.uncond_count == PRESET.queue_uncond
    assert pos.shape == (3, PRESET.n_pos, 3, 1, 1) and unc.shape == (3, PRESET.n_unc, 3, 1, 1)
    assert (pos[:, :, 2] > 0).all()                                      # items read through item(i, g)
    state = src.state_dict()
    expected = [src.next_batch(step) for step in (2, 3)]
    resumed = make_source("queue", ds, PRESET, seed=0, rank=1, world_size=2, classes_per_step=3)
    resumed.load_state_dict(state)                                        # no second pre-fill
    assert all(_equal(x, resumed.next_batch(step)) for x, step in zip(expected, (2, 3)))
    direct = make_source("direct", ds, PRESET, seed=0, rank=1, world_size=2)
    assert isinstance(direct, ClassBalancedSampler) and direct.n_classes == 2
    assert _equal(direct.next_batch(5), direct.batch(5)) and direct.state_dict()["step"] == 6
    with pytest.raises(ValueError, match="unknown batch source"):
        make_source("fifo", ds, PRESET)


class GatherDataset(ToyDataset):
    """Fetches many items in one call (the optional fast path)."""

    calls = 0

    def gather(self, indices, generator):
        GatherDataset.calls += 1
        return torch.stack([self.item(i, generator)[0] for i in indices.tolist()])


def test_gather_fast_path():
    ds = GatherDataset()
    src = QueueSource(ds, PRESET, seed=2)
    batch = src.next_batch()
    _check_batch(batch, ds, PRESET.n_classes, src.queue)
    assert GatherDataset.calls == 2                                       # positives, then unconditional
    assert _equal(batch, QueueSource(ToyDataset(), PRESET, seed=2).next_batch())   # same as item(i, g)


def test_minimal_dataset_interface():
    ds = PlainDataset()
    for src in (QueueSource(ds, PRESET, seed=2), ClassBalancedSampler(ds, PRESET, seed=2)):
        batch = src.next_batch()
        _check_batch(batch, ds, PRESET.n_classes, getattr(src, "queue", None))
        assert (batch.positives[:, :, 2] == 0).all()                     # through __getitem__
