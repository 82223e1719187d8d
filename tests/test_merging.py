"""DyMe bipartite matching and the bank's updates, checked against
brute-force references computed by hand."""

import itertools

import torch

from sv2v_core.bank import FeatureBank
from sv2v_core.config import BankConfig
from sv2v_core.merging import best_match, random_bipartite_match


def brute_force_merge(metric, x, src_index, dst_index):
    """Per row: each src token joins its most cosine-similar dst token; each
    dst becomes the mean of itself and the src tokens it received."""
    batch, _, _ = metric.shape
    merged, assignments = [], []
    for b in range(batch):
        src, dst = src_index[b].tolist(), dst_index[b].tolist()
        groups = {j: [x[b, dst[j]]] for j in range(len(dst))}
        row_assignment = []
        for i in src:
            sims = [torch.nn.functional.cosine_similarity(metric[b, i], metric[b, d], dim=0) for d in dst]
            j = int(torch.stack(sims).argmax())
            row_assignment.append(j)
            groups[j].append(x[b, i])
        merged.append(torch.stack([torch.stack(groups[j]).mean(0) for j in range(len(dst))]))
        assignments.append(row_assignment)
    return torch.stack(merged), torch.tensor(assignments)


def test_match_agrees_with_brute_force():
    torch.manual_seed(0)
    metric = torch.randn(3, 40, 8)
    values = torch.randn(3, 40, 5)
    match = random_bipartite_match(metric, torch.Generator().manual_seed(1))
    expected, assignment = brute_force_merge(metric, values, match.src_index, match.dst_index)
    assert torch.equal(match.assignment, assignment)
    torch.testing.assert_close(match.merge(values), expected)


def test_split_is_a_random_partition_into_equal_halves():
    metric = torch.randn(2, 16, 4)
    match = random_bipartite_match(metric, torch.Generator().manual_seed(0))
    for b in range(2):
        together = torch.cat([match.src_index[b], match.dst_index[b]]).sort().values
        assert torch.equal(together, torch.arange(16))
    other = random_bipartite_match(metric, torch.Generator().manual_seed(1))
    assert not torch.equal(match.src_index, other.src_index)


def test_best_match_chunks_agree_with_one_block():
    a, b = torch.randn(2, 50, 6), torch.randn(2, 30, 6)
    full = best_match(a, b, chunk=1000)
    chunked = best_match(a, b, chunk=7)
    torch.testing.assert_close(full[0], chunked[0])
    assert torch.equal(full[1], chunked[1])


def _record_frame(bank, layer, k, fuse=True):
    bank.record(layer, "k", k)
    bank.record(layer, "v", 2 * k + 1)
    if fuse:
        bank.record(layer, "o", -3 * k)
    bank.commit()


def test_dyme_bank_stays_one_frame_over_200_updates():
    bank = FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=0)
    layer = "mid_block.attentions.0.transformer_blocks.0"
    for _ in range(200):
        _record_frame(bank, layer, torch.randn(4, 64, 16))
        assert bank.tokens(layer) == 64
        assert {name: t.shape for name, t in bank.layers[layer].items()} == {
            name: (4, 64, 16) for name in ("k", "v", "o")
        }
    assert bank.merges == 199


def test_keys_values_and_outputs_follow_one_assignment():
    bank = FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=0)
    layer = "up_blocks.1.attentions.0.transformer_blocks.0"
    for _ in range(5):
        _record_frame(bank, layer, torch.randn(2, 32, 8))
    stored = bank.layers[layer]
    # v = 2k + 1 and o = −3k hold token by token only if all three were merged alike
    torch.testing.assert_close(stored["v"], 2 * stored["k"] + 1)
    torch.testing.assert_close(stored["o"], -3 * stored["k"])


def test_merge_runs_every_n_frames_and_first_frame_is_stored():
    bank = FeatureBank(BankConfig(mode="dyme", merge_every=4), seed=0)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0"
    first = torch.randn(1, 8, 4)
    _record_frame(bank, layer, first, fuse=False)
    assert torch.equal(bank.layers[layer]["k"], first)
    for _ in range(3):
        _record_frame(bank, layer, torch.randn(1, 8, 4), fuse=False)
    assert torch.equal(bank.layers[layer]["k"], first) and bank.merges == 0
    _record_frame(bank, layer, torch.randn(1, 8, 4), fuse=False)
    assert bank.merges == 1 and not torch.equal(bank.layers[layer]["k"], first)
    assert "o" not in bank.layers[layer]  # only fusion blocks keep outputs


def test_queue_keeps_the_last_k_frames():
    bank = FeatureBank(BankConfig(mode="queue", size=2, merge_every=1))
    layer = "mid_block.attentions.0.transformer_blocks.0"
    frames = [torch.full((1, 4, 2), float(i)) for i in range(5)]
    for frame in frames:
        _record_frame(bank, layer, frame)
    torch.testing.assert_close(bank.layers[layer]["k"], torch.cat(frames[-2:], dim=1))


def test_no_bank_keeps_nothing_and_reset_forgets():
    empty = FeatureBank(BankConfig(mode="none"))
    _record_frame(empty, "mid_block.attentions.0.transformer_blocks.0", torch.randn(1, 4, 2))
    assert empty.layers == {} and empty.nbytes() == 0
    bank = FeatureBank(BankConfig(mode="dyme"))
    _record_frame(bank, "mid_block.attentions.0.transformer_blocks.0", torch.randn(1, 4, 2))
    assert bank.nbytes() > 0
    bank.reset()
    assert bank.nbytes() == 0 and bank.frames == 0


def _groups_from_one_hot(merged_v):
    """Each stored token's value is the mean of one-hot ids: read back which
    of the 2N input tokens it averages."""
    return [tuple(int(i) for i in torch.nonzero(row > 1e-6).flatten()) for row in merged_v]


def test_a_due_dyme_commit_stores_the_bipartite_merge_of_old_and_new():
    """Paper §4.3: concatenate the stored and the new tokens (2N), split them
    at random into halves src and dst, send every src token to its most
    cosine-similar dst token (on the keys), average; k, v and o alike."""
    n, layer = 6, "up_blocks.1.attentions.0.transformer_blocks.0"
    torch.manual_seed(3)
    bank = FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=5)
    frames = [torch.randn(1, n, 4), torch.randn(1, n, 4)]
    ids = torch.eye(2 * n).unsqueeze(0)  # value = one-hot id of the token among the 2N
    for index, k in enumerate(frames):
        bank.record(layer, "k", k)
        bank.record(layer, "v", ids[:, index * n:(index + 1) * n])
        bank.record(layer, "o", k ** 2)
        bank.commit()
    keys = torch.cat(frames, dim=1)[0]
    stored = bank.layers[layer]
    groups = _groups_from_one_hot(stored["v"][0])
    # every token of old and new lands in exactly one of N groups ("keep only the newest" fails here)
    assert len(groups) == n and sorted(i for g in groups for i in g) == list(range(2 * n))
    assert any(i < n for g in groups for i in g) and any(i >= n for g in groups for i in g)
    for row, group in enumerate(groups):  # k and o are the means over the same group
        torch.testing.assert_close(stored["k"][0, row], keys[list(group)].mean(0))
        torch.testing.assert_close(stored["o"][0, row], (keys[list(group)] ** 2).mean(0))
    # some choice of one dst per group makes every other member's best dst its own group's
    cosine = torch.nn.functional.cosine_similarity(keys[:, None], keys[None, :], dim=-1)
    def consistent(dsts):
        return all(int(torch.tensor(dsts)[cosine[i, list(dsts)].argmax()]) == d
                   for d, group in zip(dsts, groups) for i in group if i != d)
    assert any(consistent(choice) for choice in itertools.product(*groups))


def test_dyme_splits_are_reproducible_and_restart_with_a_reset():
    layer = "mid_block.attentions.0.transformer_blocks.0"
    frames = [torch.randn(2, 16, 4) for _ in range(4)]

    def run(bank):
        for k in frames:
            _record_frame(bank, layer, k)
        return bank.layers[layer]["k"].clone()

    first = FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=1)
    result = run(first)
    assert torch.equal(result, run(FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=1)))
    assert not torch.equal(result, run(FeatureBank(BankConfig(mode="dyme", merge_every=1), seed=2)))
    first.reset()
    assert torch.equal(run(first), result)


def test_nothing_is_recorded_or_kept_between_due_frames():
    bank = FeatureBank(BankConfig(mode="dyme", merge_every=3), seed=0)
    dues = []
    for _ in range(7):
        dues.append(bank.due())
        bank.commit()
    assert dues == [True, False, False, True, False, False, True]
    assert not FeatureBank(BankConfig(mode="none")).due()


def test_an_update_policy_is_one_function(monkeypatch):
    """The seam: a bank mode is a function given every (bank, new frame) pair
    of a commit; here a toy "newest" policy that keeps only the latest frame."""
    from sv2v_core import bank as bank_module
    from sv2v_core import config as config_module

    def newest_update(jobs):
        for bank, new in jobs:
            for layer, features in new.items():
                for name, tensor in features.items():
                    bank.buffers[layer][name].copy_(tensor)

    monkeypatch.setattr(config_module, "BANK_MODES", (*config_module.BANK_MODES, "newest"))
    monkeypatch.setitem(bank_module.UPDATE_POLICIES, "newest", newest_update)
    bank = FeatureBank(BankConfig(mode="newest", merge_every=1))
    layer = "mid_block.attentions.0.transformer_blocks.0"
    frames = [torch.randn(2, 8, 4) for _ in range(3)]
    for k in frames:
        _record_frame(bank, layer, k)
    assert torch.equal(bank.layers[layer]["k"], frames[-1]) and bank.stored == 1
