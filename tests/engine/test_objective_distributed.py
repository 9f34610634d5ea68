"""The DAMA objective under torch.distributed (gloo, 2 CPU processes): DAMA.md sections 2 and 3.

Each rank holds a slice of one global batch. The objective is pure; its call site (``dama_engine.training.step``)
gathers the gaps and broadcasts the draw. The filtering draw, the model-aware factor and the running state must be
global
and identical on every rank, and match a single-process run over the whole batch with the same generator seed;
each rank's loss is the mean over its own kept pairs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dama_engine.objective.loss import ObjectiveConfig, ObjectiveState, preference_loss, reward_gap, select_pairs
from dama_engine.training.step import broadcast_selection, gather_group

WORLD_SIZE = 2
SEED = 1234
ZERO_SEED = 3
# A global batch of 6 pairs; R = (pc - rc) - (pr - rr) = [0.3, -1.2, 2.5, -0.1, 0.4, 1.7].
# With SEED the draw keeps pairs [0, 3, 4]; with ZERO_SEED it keeps [3, 4, 5], none of rank 0's.
POLICY_CHOSEN = [-3.0, -5.5, -2.0, -7.25, -4.0, -1.5]
POLICY_REJECTED = [-4.0, -3.0, -6.5, -7.0, -3.5, -4.0]
REF_CHOSEN = [-3.2, -5.0, -3.0, -7.0, -4.1, -2.0]
REF_REJECTED = [-3.9, -3.7, -5.0, -6.85, -3.2, -2.8]
HARDNESS = [0.12, -0.3, 0.45, 0.0, -0.05, 0.2]
HARDNESS_MEAN = 0.048
STATE = ObjectiveState(reward_gap_mean=0.4, reward_gap_std=1.3, steps=7)
CONFIG = ObjectiveConfig(method="dama", keep_ratio=0.5)
# case -> generator seed and, per rank, the (start, stop) of its slice of the global batch
CASES: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "even": (SEED, [(0, 3), (3, 6)]),
    "rank_without_kept_pairs": (ZERO_SEED, [(0, 3), (3, 6)]),
}


def _inputs(start: int = 0, stop: int = 6) -> tuple[torch.Tensor, ...]:
    def t(values: list[float], grad: bool = False) -> torch.Tensor:
        return torch.tensor(values[start:stop], dtype=torch.float64, requires_grad=grad)

    return (
        t(POLICY_CHOSEN, True),
        t(POLICY_REJECTED, True),
        t(REF_CHOSEN),
        t(REF_REJECTED),
        t(HARDNESS),
    )


def _run(start: int, stop: int, seed: int) -> dict[str, Any]:
    pc, pr, rc, rr, hardness = _inputs(start, stop)
    generator = torch.Generator().manual_seed(seed)
    selection, offset = None, 0
    if dist.is_initialized():
        # The call site's part: gather every rank's gaps, draw once, rank 0's draw for all.
        group, offset = gather_group(reward_gap(pc, pr, rc, rr).detach().unsqueeze(0))
        selection = broadcast_selection(select_pairs(group, STATE, CONFIG, generator))
    out = preference_loss(
        pc,
        pr,
        rc,
        rr,
        hardness=hardness,
        hardness_mean=HARDNESS_MEAN,
        state=STATE,
        config=CONFIG,
        generator=generator,
        selection=selection,
        offset=offset,
    )
    out.loss.backward()
    assert pc.grad is not None
    return {
        "keep_mask": out.keep_mask.clone(),
        "beta": out.beta.clone(),
        "losses": out.losses.detach().clone(),
        "loss": out.loss.item(),
        "grad": pc.grad.clone(),
        "state": out.state.to_dict(),
        "metrics": dict(out.metrics),
    }


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD_SIZE)
    try:
        results: dict[str, Any] = {}
        for case, (seed, split) in CASES.items():
            start, stop = split[rank]
            result = _run(start, stop, seed)
            masks: list[list[bool] | None] = [None] * WORLD_SIZE
            dist.all_gather_object(masks, result["keep_mask"].tolist())
            result["global_mask"] = [kept for mask in masks for kept in (mask or [])]
            results[case] = result
        # Generators seeded differently per rank must still give one draw shared by all ranks.
        start, stop = CASES["even"][1][rank]
        result = _run(start, stop, SEED + 1000 * rank)
        masks = [None] * WORLD_SIZE
        dist.all_gather_object(masks, result["keep_mask"].tolist())
        result["global_mask"] = [kept for mask in masks for kept in (mask or [])]
        results["rank_seeds"] = result
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dist")
    init_method = f"file://{tmp / 'rendezvous'}"
    context = mp.start_processes(
        _worker, args=(init_method, str(tmp)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 50
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the 2-process gloo run did not finish within 50 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def singles() -> dict[int, dict[str, Any]]:
    """One process over the whole global batch, per seed."""
    assert not (dist.is_available() and dist.is_initialized())
    return {seed: _run(0, 6, seed) for seed in (SEED, ZERO_SEED)}


def test_single_process_reference_keeps_k_pairs(singles: dict[int, dict[str, Any]]) -> None:
    # K = max(1, floor(0.5 * 6)) = 3 of the global batch
    for single in singles.values():
        assert int(single["keep_mask"].sum()) == 3
        assert single["metrics"]["kept"] == 3
    # the draws this file's cases were designed around
    assert singles[SEED]["keep_mask"].tolist() == [True, False, False, True, True, False]
    assert singles[ZERO_SEED]["keep_mask"].tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_share_state_and_global_keep_mask(rank_results: list[dict[str, Any]], case: str) -> None:
    r0, r1 = (rank_results[rank][case] for rank in range(WORLD_SIZE))
    assert r0["state"] == r1["state"]
    assert r0["global_mask"] == r1["global_mask"]
    assert sum(r0["global_mask"]) == 3
    assert r0["metrics"]["kept"] == r1["metrics"]["kept"] == 3
    assert r0["metrics"]["reward_gap_mean"] == r1["metrics"]["reward_gap_mean"]
    assert r0["metrics"]["alpha_m"] == r1["metrics"]["alpha_m"]


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_match_the_single_process_run(
    rank_results: list[dict[str, Any]], singles: dict[int, dict[str, Any]], case: str
) -> None:
    seed, split = CASES[case]
    single = singles[seed]
    assert rank_results[0][case]["global_mask"] == single["keep_mask"].tolist()
    for rank, (start, stop) in enumerate(split):
        result = rank_results[rank][case]
        assert result["keep_mask"].tolist() == single["keep_mask"][start:stop].tolist()
        torch.testing.assert_close(result["beta"], single["beta"][start:stop], rtol=1e-12, atol=0)
        torch.testing.assert_close(result["losses"], single["losses"][start:stop], rtol=1e-12, atol=0)
        assert result["state"] == pytest.approx(single["state"], rel=1e-12)
        assert result["metrics"]["alpha_m"] == pytest.approx(single["metrics"]["alpha_m"], rel=1e-12)
        assert result["metrics"]["reward_gap_mean"] == pytest.approx(single["state"]["reward_gap_mean"], rel=1e-12)


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_loss_is_the_mean_over_its_own_kept_pairs(
    rank_results: list[dict[str, Any]], singles: dict[int, dict[str, Any]], case: str
) -> None:
    seed, split = CASES[case]
    single = singles[seed]
    for rank, (start, stop) in enumerate(split):
        result = rank_results[rank][case]
        mask = single["keep_mask"][start:stop]
        kept = int(mask.sum())
        local_losses = single["losses"][start:stop]
        expected = float(local_losses[mask].sum()) / max(kept, 1)
        assert result["loss"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        if case == "rank_without_kept_pairs" and rank == 0:
            assert kept == 0 and result["loss"] == 0.0
        # the gradient is zero for this rank's dropped pairs, -beta_i sigma(-beta_i R_i) / kept for its kept ones
        grad = result["grad"]
        assert (grad[~mask] == 0).all()
        if kept:
            beta = single["beta"][start:stop]
            pc, pr, rc, rr, _ = _inputs(start, stop)
            gap = ((pc - rc) - (pr - rr)).detach()
            expected_grad = -beta * torch.sigmoid(-beta * gap) / kept
            torch.testing.assert_close(grad[mask], expected_grad[mask], rtol=1e-10, atol=0)


def test_differently_seeded_ranks_still_share_one_draw(rank_results: list[dict[str, Any]]) -> None:
    r0, r1 = (rank_results[rank]["rank_seeds"] for rank in range(WORLD_SIZE))
    assert r0["global_mask"] == r1["global_mask"]
    assert sum(r0["global_mask"]) == 3
    assert r0["state"] == r1["state"]
    assert r0["metrics"]["alpha_m"] == r1["metrics"]["alpha_m"]
