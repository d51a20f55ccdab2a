import random

import pytest
import torch

from blip2.config import Stage1Recipe, TrainConfig
from blip2.data.pairs import EpochSampler, drop_tokens


def _epoch(sampler: EpochSampler, epoch: int = 0) -> list[list[int]]:
    """Every full batch of one epoch, in order; the next call would start the following epoch."""
    sampler.load_state({"epoch": epoch, "pos": 0})
    batches = [sampler.next().tolist() for _ in range(sampler.n // sampler.batch_size)]
    assert sampler.epoch == epoch
    return batches


def test_epoch_visits_every_pair_once_and_drops_the_incomplete_batch():
    sampler = EpochSampler(n=103, batch_size=10, seed=1)
    batches = _epoch(sampler)
    flat = [i for b in batches for i in b]
    assert len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert len(set(flat)) == 100 and set(flat) <= set(range(103))
    assert sampler.next().tolist() == _epoch(EpochSampler(n=103, batch_size=10, seed=1), 1)[0]  # no 11th batch


def test_length_grouping_pads_less_but_visits_the_same_pairs():
    rng = random.Random(0)
    lengths = [rng.randint(20, 90) for _ in range(1000)]  # like Flickr8k captions, in characters
    plain = EpochSampler(1000, 16, seed=3)
    grouped = EpochSampler(1000, 16, seed=3, lengths=lengths, group=8)
    for epoch in range(2):  # the order is redrawn each epoch
        a, b = _epoch(plain, epoch), _epoch(grouped, epoch)
        # The same pairs per epoch (grouping reorders the shuffle, it never changes which pairs
        # an epoch uses), every batch full.
        assert sorted(i for x in a for i in x) == sorted(i for x in b for i in x)
        assert all(len(x) == 16 for x in b)

        def padded_over_real(batches):
            return sum(16 * max(lengths[i] for i in x) for x in batches) / sum(lengths[i] for x in batches for i in x)

        assert padded_over_real(a) > 1.3  # random batches: the longest text sets the width
        assert padded_over_real(b) < 1.1
        means = [sum(lengths[i] for i in x) / 16 for x in b]
        # The batches are shuffled again: in order, each window's batches would rise in length.
        rising = sum(x <= y for x, y in zip(means, means[1:], strict=False)) / (len(means) - 1)
        assert 0.25 < rising < 0.75


def test_grouped_sampler_resumes_exactly():
    lengths = [i % 37 for i in range(500)]
    s = EpochSampler(500, 8, seed=5, lengths=lengths, group=4)
    for _ in range(70):  # into the second epoch
        s.next()
    t = EpochSampler(500, 8, seed=5, lengths=lengths, group=4)
    t.load_state(s.state())
    assert [s.next().tolist() for _ in range(20)] == [t.next().tolist() for _ in range(20)]


def test_grouping_is_refused_where_it_does_harm_or_lacks_lengths():
    with pytest.raises(ValueError, match="stage 2"):
        Stage1Recipe(train=TrainConfig(group_by_length=8))
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(group_by_length=-1)
    with pytest.raises(ValueError, match="one length per pair"):
        EpochSampler(10, 2, seed=0, lengths=[1, 2], group=2)


def test_per_image_pairs_keep_each_images_first_caption():
    import torch

    from blip2.data.pairs import Pairs
    from blip2.data.records import ImageRecord

    records = [ImageRecord("a.jpg", ["a dog", "a brown dog"], [("is there a dog?", "yes")]),
               ImageRecord("b.jpg", ["", "two cats"]), ImageRecord("c.jpg", ["a bike"])]
    feats = torch.zeros(3, 2, 4)
    pairs = Pairs(records, None, 0, features=feats, per_image=True)
    assert pairs.pairs == [(0, "", "a dog"), (1, "", "two cats"), (2, "", "a bike")]  # empty captions skipped
    assert len(Pairs(records, None, 0, features=feats)) == 4
    with pytest.raises(ValueError, match="captions only"):
        Pairs(records, None, 0, features=feats, per_image=True, qa_template="Question: {} Answer:")


def test_drop_tokens_keeps_a_fresh_ordered_subset_of_each_images_tokens():
    feats = torch.arange(3 * 10 * 2, dtype=torch.float32).reshape(3, 10, 2)  # token j of image b: unique rows
    out = drop_tokens(feats, 0.3, torch.Generator().manual_seed(0))
    assert out.shape == (3, 7, 2)
    subsets = []
    for b in range(3):
        rows = [feats[b].tolist().index(row) for row in out[b].tolist()]  # which token each kept row is
        assert rows == sorted(set(rows))  # distinct tokens of this image, in their original order
        subsets.append(rows)
    assert len({tuple(s) for s in subsets}) > 1  # drawn per image, not one mask for the batch
    again = drop_tokens(feats, 0.3, torch.Generator().manual_seed(0))
    assert again.equal(out) and not drop_tokens(feats, 0.3, torch.Generator().manual_seed(1)).equal(out)
    assert drop_tokens(feats, 0.0, torch.Generator()) is feats
    assert drop_tokens(feats, 0.99, torch.Generator()).shape == (3, 1, 2)  # never empty
