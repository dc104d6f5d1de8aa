"""``DistillTrainer`` (transformers.Trainer + pyquant's Distiller): 20 CPU steps equal pyquant's own loop on the same
data and seed (dropout on, an epoch boundary, clipping, warmup), teacher frozen, per-term logs, save/resume."""
import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from pyquant.distill import DistillConfig, Distiller
from pyquant.formats import WeightQuantConfig
from pyquant.integrations.trainer import DistillTrainer
from pyquant.train import data as D
from pyquant.train.loop import TrainConfig, train
from pyquant.train.quant import prepare_student

V = 31


def _llama(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=V,
                                        max_position_embeddings=32, attention_dropout=0.2,
                                        tie_word_embeddings=False))


def _data(n=24, L=10):
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    return [{"input_ids": r} for r in (start + step * torch.arange(L)) % V]


def _pair():
    teacher = _llama(1)
    student = copy.deepcopy(teacher)
    prepare_student(student, WeightQuantConfig(method="twn", granularity="channel"))
    return teacher, student


DC = DistillConfig(ce=1.0, tsld=1.0, chunk_size=16)
STEPS, BATCH, ACCUM, LR, SEED = 20, 4, 2, 3e-3, 5  # 24 examples / (4 x 2) = 3 steps per epoch: 6 epoch boundaries


def _args(out, **kw):
    base = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                gradient_accumulation_steps=ACCUM, learning_rate=LR, weight_decay=0.01,
                warmup_steps=int(0.1 * STEPS), lr_scheduler_type="linear", max_grad_norm=0.5, seed=SEED,
                logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, dataloader_drop_last=True,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_20_steps_equal_pyquant_loop(tmp_path):
    data = _data()
    t1, s1 = _pair()
    ref = train(Distiller(s1, t1, DC), data, D.CausalCollator(),
                TrainConfig(output_dir=str(tmp_path / "loop"), max_steps=STEPS, batch_size=BATCH, grad_accum=ACCUM,
                            lr=LR, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=0.5, seed=SEED,
                            progress=False))
    t2, s2 = _pair()
    t_before = {k: v.clone() for k, v in t2.state_dict().items()}
    tr = DistillTrainer(student=s2, teacher=t2, distill_config=DC, args=_args(tmp_path / "hf"),
                        train_dataset=data, data_collator=D.CausalCollator())
    tr.train()
    got = [h["total"] for h in tr.history]
    want = [h["total"] for h in ref.history]
    assert len(got) == len(want) == STEPS
    assert [h["step"] for h in tr.history] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    for k in ("ce", "tsld"):
        torch.testing.assert_close(torch.tensor([h[k] for h in tr.history]), torch.tensor([h[k] for h in ref.history]),
                                   rtol=1e-5, atol=1e-6)
    assert got[-1] < got[0]  # it trains
    for (k, a), b in zip(s1.state_dict().items(), s2.state_dict().values()):  # same weights after 20 steps
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)
    # the teacher: frozen, eval mode, never updated, not in the optimizer
    assert not t2.training and not any(p.requires_grad for p in t2.parameters())
    assert all(torch.equal(v, t_before[k]) for k, v in t2.state_dict().items())
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in t2.parameters()}
    # each loss term is logged
    logs = [r for r in tr.state.log_history if "loss" in r]
    assert len(logs) == STEPS // 5 and all({"loss_ce", "loss_tsld", "loss_total"} <= set(r) for r in logs)
    torch.testing.assert_close(logs[0]["loss_total"], sum(got[:5]) / 5)


def test_save_model_writes_student_and_resume_loads_it(tmp_path):
    data = _data()
    t, s = _pair()
    tr = DistillTrainer(student=s, teacher=t, distill_config=DC, args=_args(tmp_path / "o", max_steps=2),
                        train_dataset=data, data_collator=D.CausalCollator())
    tr.train()
    tr.save_model(str(tmp_path / "final"))
    files = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"config.json", "model.safetensors"} <= files and "training_args.bin" not in files
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "final" / "model.safetensors"))
    assert set(sd) <= set(s.state_dict()) and not any(k.startswith("student.") for k in sd)
    # a QAT checkpoint: from_pretrained (with import pyquant) rebuilds the QAT student, same logits
    from transformers import AutoModelForCausalLM

    import pyquant

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert isinstance(back.model.layers[0].self_attn.q_proj, pyquant.QATLinear)
    x = torch.randint(0, V, (2, 7))
    assert torch.equal(back(x).logits, s.eval()(x).logits)
    s3 = _pair()[1]
    tr3 = DistillTrainer(student=s3, teacher=_llama(1), distill_config=DC, args=_args(tmp_path / "o3"),
                         train_dataset=data, data_collator=D.CausalCollator())
    tr3._load_from_checkpoint(str(tmp_path / "final"))
    for k, v in s.state_dict().items():
        assert torch.equal(v, s3.state_dict()[k]), k
    with pytest.raises(ValueError, match="no model.safetensors"):
        tr3._load_from_checkpoint(str(tmp_path))


def test_bad_construction():
    t, s = _pair()
    with pytest.raises(TypeError, match="not model="):
        DistillTrainer(model=s)
    with pytest.raises(ValueError, match="needs student="):
        DistillTrainer(teacher=t)
    with pytest.raises(ValueError, match="teacher is None"):
        DistillTrainer(student=s, distill_config=DC)


DDP_SCRIPT = r'''
import copy, json, os, sys
import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from pyquant.distill import Distiller, DistillConfig
from pyquant.formats import WeightQuantConfig
from pyquant.integrations.trainer import DistillTrainer
from pyquant.train.data import CausalCollator
from pyquant.train.loop import TrainConfig, train
from pyquant.train.quant import prepare_student

out = sys.argv[1]
rank = int(os.environ["RANK"])

def pair():
    torch.manual_seed(0)
    t = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=29, max_position_embeddings=32,
                                     attention_dropout=0.2, tie_word_embeddings=False))
    s = copy.deepcopy(t)
    prepare_student(s, WeightQuantConfig(method="twn", granularity="channel"))
    return t, s

g = torch.Generator().manual_seed(1)
data = [{"input_ids": torch.randint(0, 29, (10,), generator=g)} for _ in range(16)]
dc = DistillConfig(ce=1.0, tsld=1.0, chunk_size=16)
t, s = pair()
ref = train(Distiller(s, t, dc), data, CausalCollator(),
            TrainConfig(output_dir=os.path.join(out, "loop"), max_steps=6, batch_size=2, grad_accum=2, lr=3e-3,
                        warmup_ratio=0.0, max_grad_norm=0.5, seed=3, progress=False))
t2, s2 = pair()
args = TrainingArguments(output_dir=os.path.join(out, "hf"), max_steps=6, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=3e-3, weight_decay=0.01, warmup_steps=0,
                         max_grad_norm=0.5, seed=3, logging_steps=3, save_strategy="no", report_to=[], use_cpu=True,
                         dataloader_drop_last=True, disable_tqdm=True)
tr = DistillTrainer(student=s2, teacher=t2, distill_config=dc, args=args, train_dataset=data,
                    data_collator=CausalCollator())
tr.train()
flat = torch.cat([p.detach().flatten() for p in s2.parameters()])
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"loop": [h["total"] for h in ref.history], "hf": [h["total"] for h in tr.history],
               "sum": float(flat.double().sum()), "world": tr.args.world_size}, f)
'''


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_two_processes_equal_pyquant_ddp_loop(tmp_path):
    """Under torchrun (DDP, gloo, 2 CPU processes) the Trainer path equals pyquant's DDP loop step for step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == 2 and r0["hf"] == r1["hf"] and r0["sum"] == r1["sum"]  # replicas in sync
    assert len(r0["hf"]) == 6
    torch.testing.assert_close(torch.tensor(r0["hf"]), torch.tensor(r0["loop"]), rtol=1e-5, atol=1e-6)


def test_evaluate_reports_the_distillation_loss(tmp_path):
    t, s = _pair()
    ev = _data(8)
    tr = DistillTrainer(student=s, teacher=t, distill_config=DC, args=_args(tmp_path, per_device_eval_batch_size=8),
                        train_dataset=_data(), eval_dataset=ev, data_collator=D.CausalCollator())
    got = tr.evaluate()["eval_loss"]
    d = Distiller(s, t, DC).eval()
    with torch.no_grad():
        want = float(d(D.CausalCollator()(ev)).loss)
    assert got == pytest.approx(want, rel=1e-5)
