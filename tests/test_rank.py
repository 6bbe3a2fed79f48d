"""Rank policies: constant, dense/sparse, kurtosis budget, spectral energy; lookup and validation."""

import numpy as np
import pytest
import torch

from milo_tensor.quant.affine import quantize_rtn
from milo_tensor.quant.rank import (
    ConstantRank,
    DenseSparseRank,
    EnergyRank,
    KurtosisRank,
    WeightInfo,
    assign_ranks,
    get_rank_policy,
    kurtosis,
)
from weights import student_t


pytestmark = pytest.mark.usefixtures("one_thread")


def dense(w, fqn="model.layers.0.self_attn.q_proj.weight"):
    return WeightInfo(fqn=fqn, kind="dense", expert=None, shape=tuple(w.shape), weight=w)


def experts(ws, fqn="model.layers.0.mlp.experts.gate_up_proj"):
    return [WeightInfo(fqn=fqn, kind="expert", expert=e, shape=tuple(w.shape), weight=w) for e, w in enumerate(ws)]


def test_constant_and_dense_sparse(gen):
    w = student_t((64, 128), gen)
    ex = experts([w, w])
    assert assign_ranks(ConstantRank(16), [dense(w), *ex]) == [16, 16, 16]
    with pytest.raises(ValueError, match=r"rank 500 for model.layers.0.self_attn.q_proj.weight is outside"):
        assign_ranks(ConstantRank(500), [dense(w)])  # stated ranks are not silently clipped
    policy = DenseSparseRank(dense_rank=48, sparse_rank=8)
    assert assign_ranks(policy, [dense(w), *ex]) == [48, 8, 8]
    assert "dense_rank=48" in repr(policy) and "sparse_rank=8" in repr(policy)
    with pytest.raises(ValueError, match="rank must be an integer >= 0"):
        ConstantRank(-1)
    with pytest.raises(ValueError, match="sparse_rank"):
        DenseSparseRank(dense_rank=8, sparse_rank=-2)


def test_weight_info_repr_hides_tensor(gen):
    info = dense(student_t((64, 128), gen))
    assert "fqn='model.layers.0.self_attn.q_proj.weight'" in repr(info) and "tensor" not in repr(info)


def test_kurtosis_values(gen):
    assert abs(kurtosis(torch.randn(256, 512, generator=gen))) < 0.1  # Gaussian: excess kurtosis 0
    assert kurtosis(student_t((256, 512), gen, df=5)) > 2.0  # t5: 6 in theory
    assert kurtosis(torch.full((8, 64), 0.5)) == 0.0


def test_kurtosis_budget_and_monotone(gen):
    dfs = (50, 12, 6, 4, 3, 30, 5, 8)
    ws = [student_t((128, 256), gen, df=df) for df in dfs]
    infos = experts(ws)
    kurts = [kurtosis(w) for w in ws]
    policy = KurtosisRank(mean_rank=32, dense_rank=96)
    ranks = assign_ranks(policy, [dense(ws[0]), *infos])
    assert ranks[0] == 96
    ranks = ranks[1:]
    assert sum(ranks) <= 32 * len(ws)
    assert sum(ranks) > 32 * len(ws) - 8 * len(ws)  # the budget is used
    assert all(r % 8 == 0 for r in ranks)
    order = np.argsort(kurts)
    assert all(ranks[a] <= ranks[b] for a, b in zip(order, order[1:])), (kurts, ranks)
    assert ranks[int(order[-1])] > ranks[int(order[0])]  # heavier tails really get more
    # bounds are respected
    capped = assign_ranks(KurtosisRank(mean_rank=32, min_rank=8, max_rank=48), infos)
    assert min(capped) >= 8 and max(capped) <= 48 and sum(capped) <= 32 * len(ws)


def test_kurtosis_lone_expert_and_validation(gen):
    light, heavy = torch.randn(64, 128, generator=gen) * 0.02, student_t((64, 128), gen, df=4)
    policy = KurtosisRank(mean_rank=16)
    one = WeightInfo("m.experts.0.w1.weight", "expert", 0, (64, 128), light)
    two = WeightInfo("m.experts.1.w1.weight", "expert", 1, (64, 128), heavy)
    assert assign_ranks(policy, [one]) == [0]  # kurtosis < 1: the paper gives 0
    assert assign_ranks(policy, [two])[0] > 0
    with pytest.raises(ValueError, match="min_rank"):
        KurtosisRank(mean_rank=8, min_rank=16)


def test_energy_rank_definition_and_monotone(gen):
    w = student_t((96, 128), gen)
    info = dense(w)
    resid = (w - quantize_rtn(w, 3, 64).dequantize()).double()
    s2 = torch.linalg.svdvals(resid).square()
    kept = torch.cumsum(s2, 0) / s2.sum()
    prev = -1
    for fraction in (0.0, 0.1, 0.3, 0.5, 0.8):
        r = EnergyRank(fraction=fraction, max_rank=96)(info)
        assert r >= prev
        prev = r
        if fraction == 0:
            assert r == 0
            continue
        assert kept[r - 1] >= fraction - 1e-5  # keeps the fraction ...
        assert r == 1 or kept[r - 2] < fraction  # ... and is the smallest such r
    assert EnergyRank(fraction=0.99, max_rank=8)(info) == 8  # capped
    with pytest.raises(ValueError, match="fraction"):
        EnergyRank(fraction=1.5)


def test_energy_rank_large_weight_uses_randomized_top_r(gen):
    w = student_t((320, 384), gen)  # min side > 256: the truncated (randomized) path
    policy = EnergyRank(fraction=0.1, max_rank=64)
    r = policy(dense(w))
    resid = (w - quantize_rtn(w, 3, 64).dequantize()).double()
    kept = torch.cumsum(torch.linalg.svdvals(resid).square(), 0) / resid.square().sum()
    exact = int((kept < 0.1).sum()) + 1
    assert abs(r - exact) <= max(1, exact // 10)


def test_energy_assign_batches_a_stack(gen):
    ws = [student_t((64, 128), gen, df=df) for df in (3, 30)]
    policy = EnergyRank(fraction=0.3, max_rank=64)
    assert assign_ranks(policy, experts(ws)) == [policy(i) for i in experts(ws)]


def test_get_rank_policy():
    assert get_rank_policy("constant", rank=4) == ConstantRank(4)
    assert get_rank_policy("dense-sparse", dense_rank=32, sparse_rank=4) == DenseSparseRank(32, 4)
    assert isinstance(get_rank_policy("kurtosis", mean_rank=16), KurtosisRank)
    assert isinstance(get_rank_policy("energy", fraction=0.2), EnergyRank)
    assert get_rank_policy(12) == ConstantRank(12)
    fn = lambda info: 3  # noqa: E731
    assert get_rank_policy(fn) is fn
    with pytest.raises(ValueError, match="unknown rank policy 'lora'; valid names: constant, dense_sparse, energy, kurtosis"):
        get_rank_policy("lora")
    with pytest.raises(ValueError, match="bad options"):
        get_rank_policy("constant", rnk=3)
    with pytest.raises(ValueError, match="bool"):
        get_rank_policy(True)
    with pytest.raises(ValueError, match="rank_fn must be"):
        get_rank_policy(3.5)


def test_assign_ranks_validates_user_functions(gen):
    w = student_t((64, 128), gen)
    infos = experts([w, w])
    assert assign_ranks(lambda info: np.int64(8) if info.expert else 0, infos) == [0, 8]
    with pytest.raises(ValueError, match=r"rank 65 for model.layers.0.mlp.experts.gate_up_proj \(expert 0\) is outside \[0, min\(N, K\) = 64\]"):
        assign_ranks(lambda info: 65, infos)
    with pytest.raises(ValueError, match="rank -1 for model.layers.0.self_attn"):
        assign_ranks(lambda info: -1, [dense(w)])
    with pytest.raises(ValueError, match="must return an int"):
        assign_ranks(lambda info: 4.0, [dense(w)])

    class Budget:  # a user policy with its own assign() is used as a whole
        def __call__(self, info):
            raise AssertionError("assign() should be used")

        def assign(self, infos):
            return [8 * i for i in range(len(infos))]

    assert assign_ranks(Budget(), infos) == [0, 8]
