"""blues.train.reshard without a process group: the converter on ZeRO 1/2 files built by hand (the
layout DeepSpeed 0.19.8 writes), the refusals by message, the loader's move to another world size.
The real thing, through the launcher, is in test_reshard_distributed.py."""
import os
from collections import OrderedDict

import pytest
import torch

from blues.presets import tiny
from blues.train import reshard
from blues.train import resume_check as rc


def _write_zero_checkpoint(d, world, ep, truth, step, prefix=""):
    """The files of a ZeRO 1/2 checkpoint of `world` ranks at `ep`: dense parameters a (3, 4), b (5,)
    in group 0, partitioned over all ranks; stacked experts x (E, 3) in the expert group 1, EP rank e
    holding experts [e*E_loc, (e+1)*E_loc), partitioned over its expert-data-parallel group. Each
    state (fp32, exp_avg, exp_avg_sq) is `truth[state][name]`, cut the way DeepSpeed cuts it."""
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        OPTIMIZER_STATE_DICT,
        PARAM_SHAPES,
        PARAM_SLICE_MAPPINGS,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )
    from deepspeed.utils.tensor_fragment import fragment_address
    E = truth["fp32"]["x"].shape[0]
    E_loc = E // ep
    shapes = [OrderedDict(a=(3, 4), b=(5,)), OrderedDict(x=(E_loc, 3))]
    torch.save({PARAM_SHAPES: shapes, "blues": {"step": 7}}, os.path.join(d, "mp_rank_00_model_states.pt"))

    def partition(flats: dict, names_numel: list, parts: int, index: int):
        """This partition's slice mappings and flat tensors of a group (DeepSpeed pads the group to a
        multiple of `parts` and gives partition i the i-th equal piece)."""
        total = sum(n for _, n in names_numel)
        size = -(-total // parts)
        lo, hi = index * size, min((index + 1) * size, total)
        mapping, start = OrderedDict(), 0
        for name, n in names_numel:
            a, b = max(start, lo), min(start + n, hi)
            if a < b:
                mapping[name] = fragment_address(numel=b - a, start=a - lo)
            start += n
        return mapping, {k: v[lo:hi].clone() for k, v in flats.items()}

    for r in range(world):
        e, edp = r % ep, r // ep
        dense = {k: torch.cat([truth[k]["a"].flatten(), truth[k]["b"]]) for k in truth}
        local = {k: truth[k]["x"][e * E_loc:(e + 1) * E_loc].flatten() for k in truth}
        m0, f0 = partition(dense, [("a", 12), ("b", 5)], world, r)
        m1, f1 = partition(local, [("x", E_loc * 3)], world // ep, edp)
        groups = [{"name": "decay", "params": [0], "lr": 1e-3}, {"name": f"ep_size_{ep}", "moe": True, "params": [1]}]
        state = {i: {"step": torch.tensor(float(step)), "exp_avg": f["exp_avg"], "exp_avg_sq": f["exp_avg_sq"]}
                 for i, f in enumerate((f0, f1))}
        sd = {PARAM_SLICE_MAPPINGS: [m0, m1], SINGLE_PARTITION_OF_FP32_GROUPS: [f0["fp32"], f1["fp32"]],
              BASE_OPTIMIZER_STATE: {"state": state, "param_groups": groups}, "ds_version": "0.19.8",
              "clip_grad": 1.0}
        torch.save({OPTIMIZER_STATE_DICT: sd}, os.path.join(d, f"{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))


def _truth(E=4):
    g = torch.Generator().manual_seed(0)
    return {k: {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g),
                "x": torch.randn(E, 3, generator=g)} for k in ("fp32", "exp_avg", "exp_avg_sq")}


@pytest.mark.parametrize("world,ep,prefix", [(4, 2, ""), (2, 2, "bf16_"), (2, 1, ""), (4, 4, "")])
def test_convert_rebuilds_every_tensor_in_global_expert_order(tmp_path, world, ep, prefix):
    """world=4, ep=2 is the case that tells EP rank (r % ep) from expert-data-parallel rank (r // ep):
    swapping them puts expert 1's values where expert 2's belong. Pieces of a, b and x straddle
    partition edges (17 dense values over 4 ranks); bf16_ is the BF16_Optimizer's file prefix."""
    from deepspeed.checkpoint.constants import EP_IS_EXPERT_PARAM, EP_NUM_EXPERTS, PARAM
    truth = _truth()
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    _write_zero_checkpoint(str(src), world, ep, truth, step=7, prefix=prefix)
    reshard.convert(str(src), str(dst), ep_size=ep, world_size=world)
    for key, by_name in truth.items():
        for name, t in by_name.items():
            saved = torch.load(dst / "zero" / name / f"{key}.pt", weights_only=False)
            assert torch.equal(saved[PARAM], t), (name, key)
            if name == "x":
                assert saved[EP_IS_EXPERT_PARAM] is True and saved[EP_NUM_EXPERTS] == 4
            else:
                assert EP_IS_EXPERT_PARAM not in saved
    for name in ("a", "b", "x"):
        assert torch.equal(torch.load(dst / "zero" / name / "step.pt", weights_only=False), torch.tensor(7.0))
    glob = torch.load(dst / "zero" / "optimizer_state.pt", weights_only=False)
    # the loader copies every key but params into the live group at the same place: no name, no moe
    assert glob["param_groups"] == [{"lr": 1e-3}, {}]
    assert glob["ds_version"] == "0.19.8" and glob["clip_grad"] == 1.0
    assert torch.load(dst / "mp_rank_00_model_states.pt", weights_only=False)["blues"] == {"step": 7}
    assert reshard.converted_groups(str(dst)) == [{"name": "decay", "moe": False},
                                                  {"name": f"ep_size_{ep}", "moe": True}]


def test_convert_refuses_files_that_do_not_belong_together(tmp_path):
    truth = _truth()
    _write_zero_checkpoint(str(tmp_path), 2, 2, truth, step=1)
    with pytest.raises(ValueError, match=r"was written by 4 ranks but lacks zero_pp_rank_2_mp_rank_00_optim_states.pt, "
                                         r"zero_pp_rank_3_mp_rank_00_optim_states.pt"):
        reshard.convert(str(tmp_path), str(tmp_path / "u"), ep_size=2, world_size=4)
    # read as ep=1 (one EP rank), rank 1's expert pieces are a second half of a 2-expert stack: 12 values for 6
    with pytest.raises(ValueError, match=r"the pieces of x \(fp32\) of EP rank 0 hold 12 values, the parameter "
                                         r"\(2, 3\) has 6"):
        reshard.convert(str(tmp_path), str(tmp_path / "u"), ep_size=1, world_size=2)
    with pytest.raises(ValueError, match="holds no ZeRO 1/2 optimizer files"):
        reshard.convert(str(tmp_path / "u"), str(tmp_path / "v"), ep_size=1, world_size=1)


# ----------------------------------------------------------------------------- what resumes, what is refused

def _meta(world=2, stage=2, **cfg):
    return {"config": tiny().replace(**cfg).to_dict(), "world_size": world, "zero_stage": stage,
            "tokenizer_sha256": "t" * 64, "expert_group": f"ep_size_{cfg.get('ep_size', 1)}"}


def test_another_ep_size_or_world_size_resumes_under_zero_1_and_2():
    for stage in (1, 2):
        for meta, cfg, world in ((_meta(ep_size=2, stage=stage), tiny(), 2),
                                 (_meta(stage=stage), tiny().replace(ep_size=2), 2),
                                 (_meta(ep_size=2, stage=stage), tiny(), 1),
                                 (_meta(world=1, stage=stage), tiny().replace(ep_size=2), 4)):
            assert reshard.needs_reshard(meta, cfg, world)
            changes = rc.check_resume(meta, cfg, "t" * 64, world, stage)
            assert changes == [] or changes == [f"ep_size: {meta['config']['ep_size']} -> {cfg.train.ep_size}"]
    assert not reshard.needs_reshard(_meta(ep_size=2), tiny().replace(ep_size=2), 2)


@pytest.mark.parametrize("meta,cfg,world,stage,expected", [
    (_meta(ep_size=2, stage=3), tiny(), 2, 3,
     "ep_size 2 -> 1, world size 2 -> 2 needs ZeRO 1 or 2 at both ends (the checkpoint has ZeRO 3, this run ZeRO 3; "),
    (_meta(stage=0), tiny(), 1, 0,
     "ep_size 1 -> 1, world size 2 -> 1 needs ZeRO 1 or 2 at both ends (the checkpoint has ZeRO 0, this run ZeRO 0; "),
    (_meta(ep_size=2, stage=2), tiny(), 2, 1, "ZeRO stage 2 -> 1"),
    (_meta(ep_size=2, dtype="bf16"), tiny(), 2, 2, "dtype: 'bf16' -> 'fp32'"),
    (_meta(moe_backend="deepspeed", balance_bias_rate=0.0, ep_size=2),
     tiny().replace(moe_backend="deepspeed", balance_bias_rate=0.0), 2, 2,
     "ep_size 2 -> 1, world size 2 -> 2 with moe_backend=deepspeed: DeepSpeed's MoE keeps one file per expert"),
])
def test_refused_changes_are_named(meta, cfg, world, stage, expected):
    with pytest.raises(ValueError, match="cannot resume") as e:
        rc.check_resume(meta, cfg, "t" * 64, world, stage)
    assert expected in str(e.value), str(e.value)


def test_checkpoint_from_before_the_expert_group_is_refused():
    meta = _meta(ep_size=2)
    del meta["expert_group"]  # written before issue 10: the experts sat in the dense decay group
    with pytest.raises(ValueError, match="keeps the expert weights in the dense optimizer group"):
        rc.check_resume(meta, tiny(), "t" * 64, 2, 2)


def test_ep_size_that_does_not_divide_num_experts_is_a_config_error():
    with pytest.raises(ValueError, match=r"ep_size=3 is invalid: must divide num_experts=16"):
        tiny().replace(ep_size=3)


def test_optimizer_groups_must_line_up():
    saved = [{"name": "decay", "moe": False}, {"name": "no_decay", "moe": False}, {"name": "ep_size_2", "moe": True}]
    reshard.check_groups(saved, [{"name": "decay"}, {"name": "no_decay"}, {"name": "ep_size_1", "moe": True}])
    with pytest.raises(ValueError, match=r"groups \['decay', 'no_decay', 'experts'\] do not line up with this run's "
                                         r"\['decay', 'experts'\]"):
        reshard.check_groups(saved, [{"name": "decay"}, {"name": "ep_size_1", "moe": True}])


# ----------------------------------------------------------------------------- the data stream

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from blues.data.prepare import prepare
    d = tmp_path_factory.mktemp("data")
    prepare(str(d), progress=False)
    return str(d)


@pytest.mark.parametrize("old,new,batches", [(2, 1, 3), (1, 2, 4), (2, 4, 6), (4, 2, 5)])
def test_loader_moves_to_another_world_size_without_skipping_or_repeating(data_dir, old, new, batches):
    """After `batches` batches on `old` ranks, `new` ranks resumed from the moved state serve exactly the
    windows the old ranks would have served next (the same global batches, dealt differently)."""
    from blues.data.loader import TokenLoader

    def loaders(world):
        return [TokenLoader(data_dir, "train", block_size=32, batch_size=4 * 4 // world, seed=3, rank=r,
                            world_size=world) for r in range(world)]
    before = loaders(old)  # 16 sequences per global batch at every world size
    for _ in range(batches):
        for ld in before:
            ld.next_batch()
    state, note = reshard.loader_state_for_world(before[0].state_dict(), new)
    assert note is None  # 16 * batches windows used: a multiple of every new world size here
    after = loaders(new)
    for ld in after:
        ld.load_state_dict(state)
    for _ in range(2):
        want = sorted(map(tuple, torch.cat([ld.next_batch()[0] for ld in before]).tolist()))
        got = sorted(map(tuple, torch.cat([ld.next_batch()[0] for ld in after]).tolist()))
        assert got == want


def test_loader_move_that_is_not_exact_says_so():
    state = {"epoch": 0, "pos": 3, "batches": 3, "world_size": 1, "seed": 0}
    moved, note = reshard.loader_state_for_world(state, 2)
    assert moved["pos"] == 1 and moved["world_size"] == 2
    assert note == ("the data stream moves from 1 to 2 ranks inside an epoch: 1 window(s) of this epoch are served "
                    "a second time")
