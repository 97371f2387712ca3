"""Tensor parallelism over 2 CPU processes (gloo) against one process: logits, gradients, clipping, AdamW, weights.

One spawn per model config runs every check inside the two ranks (a failed check raises there, and
`torch.multiprocessing.spawn` re-raises it here with the rank's traceback). The layout permutation and the
one-line errors are plain unit tests.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from haina.core.errors import HainaError
from haina.model.config import ModelConfig
from haina.model.transformer import Transformer, lm_loss
from haina.train.optim import param_groups
from haina.train.tensor_parallel import (
    apply_tensor_parallel,
    check_tensor_parallel,
    clip_grad_norm_,
    from_tp_layout,
    full_optimizer_state,
    full_weights,
    load_full_optimizer_state,
    load_full_weights,
    split_param_groups,
    to_tp_layout,
)

GPT2 = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)  # gelu, bias, MHA, learned, tied
LLAMA = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
                    pos="rope", mlp="swiglu", bias=False, intermediate_size=48, tie_embeddings=False)
TOL = {"rtol": 1e-5, "atol": 1e-5}
STEPS, MAX_NORM = 3, 0.05


# ----------------------------------------------------------------- the layout, without processes
def _weights(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) for k, v in Transformer(cfg).weights().items()}  # biases too, not zeros


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_layout_gives_each_rank_its_own_heads_and_is_inverted_exactly(cfg):
    w = _weights(cfg)
    tp_w = to_tp_layout(w, cfg, 2)
    nh, nkv, hs = cfg.n_head, cfg.kv_heads, cfg.head_dim
    q, k, v = w["blocks.1.attn.qkv.weight"].split([nh * hs, nkv * hs, nkv * hs])
    for r, block in enumerate(tp_w["blocks.1.attn.qkv.weight"].chunk(2)):  # what ColwiseParallel gives rank r
        expected = torch.cat([q.chunk(2)[r], k.chunk(2)[r], v.chunk(2)[r]])
        assert torch.equal(block, expected)
    fc = w["blocks.0.mlp.fc.weight"]
    if cfg.mlp == "swiglu":
        gate, up = fc.chunk(2)
        assert torch.equal(tp_w["blocks.0.mlp.fc.weight"].chunk(2)[1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    else:
        assert tp_w["blocks.0.mlp.fc.weight"] is fc  # one projection: its rows are already per rank
    moved = {k for k in w if not torch.equal(w[k], tp_w[k])}
    assert moved == {k for k in w if ".qkv." in k or (cfg.mlp == "swiglu" and ".fc." in k)}
    back = from_tp_layout(tp_w, cfg, 2)
    assert back.keys() == w.keys() and all(torch.equal(back[k], w[k]) for k in w)
    assert all(torch.equal(a, b) for a, b in zip(to_tp_layout(w, cfg, 1).values(), w.values()))


def test_tp_that_does_not_divide_the_heads_is_one_line_naming_what_would_work():
    with pytest.raises(HainaError) as e:
        check_tensor_parallel(ModelConfig(n_head=6, n_embd=96), 4)
    assert str(e.value) == ("parallel.tp=4 does not divide the model's n_head=6 and n_kv_head=6: each rank takes "
                            "whole heads and an equal slice of the MLP; use parallel.tp in 1, 2, 3, 6")
    with pytest.raises(HainaError, match=r"n_kv_head=1: .* use parallel.tp in 1$"):
        check_tensor_parallel(ModelConfig(n_head=4, n_kv_head=1), 2)  # multi-query: one key head cannot split
    with pytest.raises(HainaError, match=r"^parallel.tp=2 does not divide the model's ffn_dim=33"):
        check_tensor_parallel(ModelConfig(n_head=4, intermediate_size=33), 2)
    with pytest.raises(HainaError, match="at least 1"):
        check_tensor_parallel(GPT2, 0)
    check_tensor_parallel(LLAMA, 2)
    with pytest.raises(HainaError, match="does not divide"):
        to_tp_layout(_weights(LLAMA), LLAMA, 4)  # 2 key heads over 4 ranks


class _Mesh:
    """What `apply_tensor_parallel` asks of a mesh before it splits anything."""

    def size(self) -> int:
        return 2


def test_layers_tp_cannot_split_are_refused_before_anything_changes():
    class Adapter(torch.nn.Linear):
        pass

    model = Transformer(LLAMA)
    old = model.blocks[1].mlp.proj
    model.blocks[1].mlp.proj = Adapter(old.in_features, old.out_features, bias=False)
    before = {k: v.clone() for k, v in model.weights().items()}
    with pytest.raises(HainaError, match=r"^tensor parallelism cannot split blocks.1.mlp.proj, a Adapter; it splits plain nn.Linear layers only"):
        apply_tensor_parallel(model, _Mesh())
    assert all(torch.equal(before[k], v) for k, v in model.weights().items())
    model = Transformer(GPT2)
    model.blocks[0].attn.qkv.forward = lambda x: x  # what packing a Linear does
    with pytest.raises(HainaError, match="a Linear with a replaced forward"):
        apply_tensor_parallel(model, _Mesh())
    with pytest.raises(HainaError, match="does not divide"):
        apply_tensor_parallel(Transformer(ModelConfig(n_head=4, n_kv_head=1)), _Mesh())


# ----------------------------------------------------------------- 2 ranks against one process
def _gathered_grads(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    return from_tp_layout(grads, cfg, 2)


def _assert_close_dicts(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), what
    for k, expected in want.items():
        torch.testing.assert_close(got[k], expected, **TOL, msg=lambda m, k=k: f"{what} {k}: {m}")


def _adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    groups = split_param_groups(param_groups(model.named_parameters(), weight_decay=0.1))
    return torch.optim.AdamW(groups, lr=1e-3, fused=True)


def _worker(rank: int, port: int, cfg: ModelConfig) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        torch.manual_seed(0)
        ref = Transformer(cfg)
        ref.gradient_checkpointing = cfg.mlp == "swiglu"  # recomputation through DTensor layers, on one config
        model = copy.deepcopy(ref)
        start = {k: v.clone() for k, v in ref.weights().items()}
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randint(0, cfg.vocab_size, (2, 16), generator=gen),
                    torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)) for _ in range(STEPS)]

        apply_tensor_parallel(model, mesh)
        assert isinstance(model.blocks[0].attn.qkv.weight, DTensor) and not isinstance(model.tok_emb.weight, DTensor)
        assert model.blocks[0].attn.n_head == cfg.n_head // 2 and model.blocks[0].attn.n_kv == cfg.kv_heads // 2
        # The whole weights gathered on rank 0 are the plain model's, exactly.
        full = full_weights(model, cfg, 2)
        if rank == 0:
            assert full.keys() == start.keys() and all(torch.equal(full[k], start[k]) for k in start)
        else:
            assert full is None

        ref_opt, opt = _adamw(ref), _adamw(model)
        # Matrices split into DTensor and plain groups; so do 1-D tensors when there are biases beside the norms.
        assert len(opt.param_groups) == len(ref_opt.param_groups) + (2 if cfg.bias else 1)
        for step, (x, y) in enumerate(batches):
            ref_opt.zero_grad(set_to_none=True)
            opt.zero_grad(set_to_none=True)
            ref_logits, logits = ref(x), model(x)
            torch.testing.assert_close(logits, ref_logits, **TOL)
            lm_loss(ref_logits, y).backward()
            lm_loss(logits, y).backward()
            ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
            _assert_close_dicts(_gathered_grads(model, cfg), ref_grads, f"step {step} gradient")
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
            norm = clip_grad_norm_(model.parameters(), MAX_NORM)
            assert ref_norm > MAX_NORM, "the check needs gradients that are clipped"
            assert type(norm) is torch.Tensor and norm.dim() == 0
            torch.testing.assert_close(norm, ref_norm, **TOL)
            _assert_close_dicts(_gathered_grads(model, cfg), {n: p.grad for n, p in ref.named_parameters()},
                                f"step {step} clipped gradient")
            if step == 0:  # max_norm 0: the norm only, gradients untouched
                again = clip_grad_norm_(model.parameters(), 0)
                torch.testing.assert_close(again, torch.nn.utils.get_total_norm(
                    [g for g in _gathered_grads(model, cfg).values()]), **TOL)
            ref_opt.step()
            opt.step()

        trained = {k: v.detach() for k, v in ref.weights().items()}
        full = full_weights(model, cfg, 2)
        if rank == 0:
            _assert_close_dicts(full, trained, "trained weight")
            assert any(not torch.equal(trained[k], start[k]) for k in start)
        # The optimizer's moments, gathered by name and in the plain layout, are the single process's.
        state = full_optimizer_state(model, opt, cfg, 2)
        ref_state = get_optimizer_state_dict(ref, ref_opt, options=StateDictOptions(full_state_dict=True))
        if rank == 0:
            assert state["state"].keys() == ref_state["state"].keys()
            for name, fields in ref_state["state"].items():
                _assert_close_dicts(state["state"][name], fields, f"optimizer state of {name}")

        # Loading whole weights and optimizer state into a fresh tensor-parallel model continues as the reference.
        fresh = Transformer(cfg)
        apply_tensor_parallel(fresh, mesh)
        load_full_weights(fresh, cfg, 2, trained)
        fresh_opt = _adamw(fresh)
        # A copy, as read from a file: the reference's own state tensors would be stepped by both optimizers.
        load_full_optimizer_state(fresh, fresh_opt, cfg, 2, copy.deepcopy(ref_state))
        full = full_weights(fresh, cfg, 2)
        if rank == 0:
            assert all(torch.equal(full[k], trained[k]) for k in trained)
        x, y = batches[0]
        for m, o in ((ref, ref_opt), (fresh, fresh_opt)):
            o.zero_grad(set_to_none=True)
            lm_loss(m(x), y).backward()
            o.step()
        full = full_weights(fresh, cfg, 2)
        if rank == 0:
            _assert_close_dicts(full, {k: v.detach() for k, v in ref.weights().items()}, "resumed step's weight")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2-mha-gelu-bias", "llama-gqa-swiglu-rope"])
def test_tensor_parallel_over_2_ranks_trains_as_one_process(cfg, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two ranks on a 2-core runner
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, cfg), nprocs=2, join=True)
