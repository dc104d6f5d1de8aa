"""FSDP2 (``TrainConfig.distributed="fsdp"``, ``--fsdp``): a 2-process ``torchrun`` run on CPU (gloo) matches the
DDP run's losses, writes a full (unsharded) checkpoint that loads into a plain model, and resumes from it exactly;
plus the parts that need no process group (config, CLI flag, block finding, the WORLD_SIZE 1 fallback)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pyquant.train.loop import TrainConfig, find_blocks, train

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, shutil, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from pyquant.distill import Distiller, DistillConfig
    from pyquant.formats import WeightQuantConfig
    from pyquant.train.data import CausalCollator
    from pyquant.train.loop import TrainConfig, train
    from pyquant.train.quant import prepare_student

    root = sys.argv[1]
    rank = int(os.environ["RANK"])
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=29, max_position_embeddings=32, tie_word_embeddings=True)

    def distiller():
        torch.manual_seed(0)
        teacher = LlamaForCausalLM(cfg)
        student = LlamaForCausalLM(cfg)
        student.load_state_dict(teacher.state_dict())
        prepare_student(student, WeightQuantConfig(method="twn", granularity="channel"))
        return Distiller(student, teacher, DistillConfig(ce=1.0, tsld=1.0)), teacher

    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 29, (10,), generator=g)} for _ in range(32)]

    def run(out, mode, **kw):
        d, teacher = distiller()
        t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
        probe = data[0]["input_ids"][None]
        ev = lambda m: {"logit_sum": float(m(input_ids=probe).logits.double().sum())}  # calls the student itself
        res = train(d, data, CausalCollator(), TrainConfig(output_dir=out, max_steps=6, batch_size=2, grad_accum=2,
                                                           lr=1e-2, progress=False, save_every=3, distributed=mode,
                                                           **kw), eval_fn=ev)
        teacher_kept = all(torch.equal(t0[k], v) and type(v) is torch.Tensor
                           for k, v in teacher.state_dict().items())
        evals = [h["eval"]["logit_sum"] for h in res.history if "eval" in h]
        return [h["total"] for h in res.history if "total" in h] + evals, teacher_kept, d

    fsdp, kept, d = run(os.path.join(root, "fsdp"), "fsdp")
    sharded = type(next(d.student.parameters())).__name__
    ddp, _, _ = run(os.path.join(root, "ddp"), "ddp")
    if rank == 0:
        os.makedirs(os.path.join(root, "resume"))
        shutil.copytree(os.path.join(root, "fsdp", "checkpoint-00000003"),
                        os.path.join(root, "resume", "checkpoint-00000003"))
    torch.distributed.barrier()
    resumed, _, _ = run(os.path.join(root, "resume"), "fsdp", resume=True)
    if rank == 0:  # the same FSDP checkpoint, resumed under DDP
        os.makedirs(os.path.join(root, "resume_ddp"))
        shutil.copytree(os.path.join(root, "fsdp", "checkpoint-00000003"),
                        os.path.join(root, "resume_ddp", "checkpoint-00000003"))
    torch.distributed.barrier()
    resumed_ddp, _, _ = run(os.path.join(root, "resume_ddp"), "ddp", resume=True)
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump({"fsdp": fsdp, "ddp": ddp, "resumed": resumed, "resumed_ddp": resumed_ddp, "teacher_kept": kept, "param_type": sharded,
                   "world": int(os.environ["WORLD_SIZE"])}, f)
    torch.distributed.destroy_process_group()
''')


def _student():
    from transformers import LlamaConfig, LlamaForCausalLM

    from pyquant.formats import WeightQuantConfig
    from pyquant.train.quant import prepare_student

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=29, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    s = LlamaForCausalLM(cfg)
    prepare_student(s, WeightQuantConfig(method="twn", granularity="channel"))
    return s


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_fsdp_two_processes_cpu(tmp_path):
    from pyquant.train.checkpoint import load_checkpoint
    from pyquant.train.loop import param_groups

    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    root = tmp_path / "runs"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(root)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((root / "rank0.json").read_text())
    r1 = json.loads((root / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["param_type"] == "DTensor"  # the student really was sharded
    assert r0["teacher_kept"] and r1["teacher_kept"]  # frozen teacher: plain tensors, unchanged, not optimized
    f, d = r0["fsdp"], r0["ddp"]  # 6 losses, then eval_fn's result (FSDP: run on every rank)
    assert len(f) == 7 and len(r1["fsdp"]) == 7 and len(d) == 7 and len(r1["ddp"]) == 6
    assert all(map(lambda x: x == x and abs(x) < 1e6, f))
    assert f == r1["fsdp"]  # logged terms are averaged over ranks; both ranks evaluate the same gathered model
    # FSDP computes the DDP update (same global batch, averaged gradients); only reduction order differs
    assert f == pytest.approx(d, rel=1e-4, abs=1e-5)
    # resumed from the step-3 full checkpoint: steps 4..6 repeat the uninterrupted run
    assert r0["resumed"] == f[3:] == r1["resumed"]
    assert r0["resumed_ddp"] == pytest.approx(f[3:], rel=1e-4, abs=1e-5)  # the checkpoint does not need FSDP
    ck = sorted(p.name for p in (root / "fsdp").glob("checkpoint-*"))
    assert ck == ["checkpoint-00000003", "checkpoint-00000006"]
    # FSDP and DDP write the same files: same keys, same shapes, values equal up to reduction order
    from safetensors.torch import load_file

    a = load_file(str(root / "fsdp" / "checkpoint-00000006" / "model.safetensors"))
    b = load_file(str(root / "ddp" / "checkpoint-00000006" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), k
    # ...and the full checkpoint loads, with its optimizer state, into an unsharded student
    s = _student()
    opt = torch.optim.AdamW(param_groups(s, 0.01), lr=1e-2)
    meta = load_checkpoint(root / "fsdp" / "checkpoint-00000006", s, opt, restore_rng=False)
    assert meta["step"] == 6
    for k, v in s.state_dict().items():
        if k in a:
            assert torch.equal(v, a[k]), k
    st = torch.load(root / "fsdp" / "checkpoint-00000006" / "trainer_state.pt", weights_only=False)["optimizer"]
    ref = torch.load(root / "ddp" / "checkpoint-00000006" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert sorted(st["state"]) == sorted(ref["state"])
    assert [g["params"] for g in st["param_groups"]] == [g["params"] for g in ref["param_groups"]]
    for i in ref["state"]:
        assert st["state"][i]["exp_avg"].shape == ref["state"][i]["exp_avg"].shape
    assert len(opt.state) == len(ref["state"])


def test_distributed_config_is_validated():
    assert TrainConfig(output_dir="x", distributed="fsdp").distributed == "fsdp"
    assert TrainConfig(output_dir="x").distributed == "ddp"
    with pytest.raises(ValueError, match=r"TrainConfig\.distributed='zero3'"):
        TrainConfig(output_dir="x", distributed="zero3")
    # not part of the trajectory fingerprint: DDP/FSDP checkpoints resume under either
    assert "distributed" not in TrainConfig(output_dir="x", distributed="fsdp").fingerprint()


def test_cli_fsdp_flag():
    import argparse

    from pyquant.train.cli import _add_train_args, _train_config

    p = argparse.ArgumentParser()
    _add_train_args(p)
    assert _train_config(p.parse_args(["--output-dir", "o", "--fsdp"])).distributed == "fsdp"
    assert _train_config(p.parse_args(["--output-dir", "o"])).distributed == "ddp"

    from pyquant.train.cli import add_finetune_arguments, add_qat_clm_arguments

    p = argparse.ArgumentParser()
    add_qat_clm_arguments(p)
    assert _train_config(p.parse_args(["--teacher", "t", "--output-dir", "o", "--fsdp"])).distributed == "fsdp"
    p = argparse.ArgumentParser()
    add_finetune_arguments(p)  # finetune saves with save_pretrained on rank 0: no sharded parameters there
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--output-dir", "o", "--fsdp"])


def test_find_blocks():
    s = _student()
    assert find_blocks(s) == list(s.model.layers)

    class Moe(nn.Module):  # an experts list inside each block is longer but holds fewer parameters
        def __init__(self):
            super().__init__()
            experts = lambda: nn.ModuleList(nn.Linear(2, 2) for _ in range(6))  # noqa: E731
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), experts()) for _ in range(3))
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])  # not one class: not blocks

    m = Moe()
    assert find_blocks(m) == list(m.layers)
    assert find_blocks(nn.Linear(3, 3)) == []


def test_fsdp_without_torchrun_trains_unsharded_with_notice(tmp_path, monkeypatch, capsys):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)

    class Out:
        def __init__(self, loss):
            self.loss, self.losses = loss, {"total": loss.detach()}

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, batch):
            return Out(((self.lin(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean())

    torch.manual_seed(0)
    data = [{"x": torch.randn(4), "y": torch.tensor(1.0)} for _ in range(16)]
    collate = lambda ex: {"x": torch.stack([e["x"] for e in ex]), "y": torch.stack([e["y"] for e in ex]),  # noqa
                          "input_ids": torch.zeros(len(ex), 1)}
    m = M()
    res = train(m, data, collate, TrainConfig(output_dir=str(tmp_path / "o"), max_steps=3, batch_size=4, lr=1e-1,
                                              progress=False, distributed="fsdp"))
    assert "training unsharded in one process" in capsys.readouterr().err
    assert type(m.lin.weight) is nn.Parameter and len(res.history) == 3
    assert (tmp_path / "o" / "checkpoint-00000003" / "model.safetensors").exists()
