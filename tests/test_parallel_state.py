"""Rank grid and process groups: Megatron-LM's order (TP fastest, then DP, then PP)."""
import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_distributed
from megatron_lite.parallel.state import ParallelConfigError, initialize_parallel, rank_grid


def test_rank_grid_order():
    g = rank_grid(8, tp=2, pp=2, dp=2)
    assert g[0, 0].tolist() == [0, 1]          # a TP group: consecutive ranks
    assert g[0, :, 0].tolist() == [0, 2]       # a DP group strides by TP
    assert g[:, 0, 0].tolist() == [0, 4]       # a PP group strides by TP * DP


def test_bad_world_size_is_clear():
    with pytest.raises(ParallelConfigError, match="tensor-model-parallel-size"):
        rank_grid(6, tp=4, pp=1, dp=1)


def _groups(rank, world):
    s = initialize_parallel(tensor=2, pipeline=2, data=2)
    t = torch.tensor([float(rank)])
    sums = {}
    for name, group in (("tp", s.tp_group), ("dp", s.dp_group), ("pp", s.pp_group), ("emb", s.embedding_group)):
        x = t.clone()
        dist.all_reduce(x, group=group)
        sums[name] = x.item()
    return dict(tp=(s.tp_rank, s.tp_ranks), dp=(s.dp_rank, s.dp_ranks), pp=(s.pp_rank, s.pp_ranks),
                emb=s.embedding_ranks, sums=sums, first=s.is_pipeline_first_stage(), last=s.is_pipeline_last_stage())


@pytest.mark.timeout(150)
def test_groups_tp2_pp2_dp2():
    out = run_distributed(_groups, 8, timeout=120)
    for rank, o in enumerate(out):
        tp_rank, dp_rank, pp_rank = rank % 2, (rank // 2) % 2, rank // 4
        assert o["tp"] == (tp_rank, [rank - tp_rank, rank - tp_rank + 1])
        assert o["dp"][0] == dp_rank and o["pp"][0] == pp_rank
        assert o["pp"][1] == [rank % 4, rank % 4 + 4]
        assert o["emb"] == o["pp"][1]
        assert o["sums"]["tp"] == sum(o["tp"][1]) and o["sums"]["pp"] == sum(o["pp"][1])
        assert o["sums"]["dp"] == sum(o["dp"][1])
        assert o["first"] == (pp_rank == 0) and o["last"] == (pp_rank == 1)
