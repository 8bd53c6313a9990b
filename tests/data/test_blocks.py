"""ResumableDataLoader: a loaded state continues the saved epoch's order; the random stream is left as it was."""

import torch

from lego_lightning.data.blocks import EpochSeededRandomSampler, ResumableDataLoader, TokenBlocks


def loader(n=10, batch_size=2, seed=0):
    blocks = TokenBlocks.from_tensors(torch.arange(n * 4).view(n, 4), torch.arange(n * 4).view(n, 4) + 1)
    return ResumableDataLoader(blocks, batch_size=batch_size, sampler=EpochSeededRandomSampler(blocks, seed))


def indices(batches):
    return [b["index"].tolist() for b in batches]


def test_a_loaded_state_continues_the_epoch_it_was_saved_in():
    saved = loader()
    saved.sampler.set_epoch(3)
    iterator = iter(saved)
    seen = [next(iterator) for _ in range(2)]
    state = saved.state_dict()
    assert state == {"epoch": 3, "batches_given": 2}
    rest = list(iterator)

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(3)  # Lightning sets the epoch before the first batch
    assert indices(resumed) == indices(rest)
    assert len(indices(seen)) + len(indices(rest)) == len(saved)
    assert resumed.state_dict()["batches_given"] == len(saved)


def test_a_state_from_the_end_of_an_epoch_starts_the_next_one_whole():
    saved = loader()
    saved.sampler.set_epoch(1)
    list(saved)
    resumed = loader()
    resumed.load_state_dict(saved.state_dict())
    resumed.sampler.set_epoch(2)
    fresh = loader()
    fresh.sampler.set_epoch(2)
    assert indices(resumed) == indices(fresh)


def test_the_iterator_draws_its_seed_at_the_first_batch_and_a_replacement_draws_none():
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    iterator = iter(loader())  # asked for: no draw yet
    assert torch.equal(torch.rand(1), expected)

    saved = loader()
    saved_iterator = iter(saved)
    next(saved_iterator)
    resumed = loader()
    resumed.load_state_dict(saved.state_dict())
    torch.manual_seed(0)
    next(iter(resumed))  # replaces an iterator the saved run had created: no draw
    assert torch.equal(torch.rand(1), expected)
    torch.manual_seed(0)
    next(iterator)  # a new epoch's iterator draws its seed, as a plain DataLoader's does
    assert not torch.equal(torch.rand(1), expected)


def test_the_shuffle_is_torchs_randperm_of_seed_plus_epoch():
    # The order every committed result was trained with: randperm(n) under the seed plus the epoch.
    for n, seed, epoch in ((10, 0, 0), (1000, 3, 2), (200_003, 7, 5)):
        sampler = EpochSeededRandomSampler(range(n), seed)
        sampler.set_epoch(epoch)
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        assert list(sampler) == expected


def test_shuffling_many_blocks_holds_no_python_list_of_them():
    import tracemalloc

    from torch.utils.data import RandomSampler

    def peak_while_iterating(sampler):
        tracemalloc.start()
        seen = sum(1 for _ in sampler)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return seen, peak

    n = 1 << 22  # 4M blocks
    seen, ours = peak_while_iterating(EpochSeededRandomSampler(range(n), 0))
    theirs_seen, theirs = peak_while_iterating(RandomSampler(range(n), generator=torch.Generator().manual_seed(0)))
    assert seen == theirs_seen == n
    assert theirs > 80 * 2**20  # torch's RandomSampler: a Python list of every index
    assert ours < 8 * 2**20  # one slice of 65,536 ints at a time
