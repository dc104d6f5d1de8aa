"""A 2-process ``torchrun`` DDP run on CPU (gloo): completes, keeps the replicas identical, and rank 0 alone writes
the log and the checkpoint."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from pyquant.distill import Distiller, DistillConfig
    from pyquant.formats import WeightQuantConfig
    from pyquant.train.data import CausalCollator
    from pyquant.train.loop import TrainConfig, train
    from pyquant.train.quant import prepare_student

    out = sys.argv[1]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=29, max_position_embeddings=32, tie_word_embeddings=False)
    teacher = LlamaForCausalLM(cfg)
    student = LlamaForCausalLM(cfg)
    student.load_state_dict(teacher.state_dict())
    prepare_student(student, WeightQuantConfig(method="twn", granularity="channel"))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 29, (10,), generator=g)} for _ in range(32)]
    d = Distiller(student, teacher, DistillConfig(ce=1.0, tsld=1.0))
    res = train(d, data, CausalCollator(), TrainConfig(output_dir=out, max_steps=4, batch_size=2, lr=1e-2,
                                                        progress=False, save_every=2))
    rank = int(os.environ["RANK"])
    flat = torch.cat([p.detach().flatten() for p in student.parameters()])
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"params": flat.tolist()[:4096], "sum": float(flat.double().sum()),
                   "losses": [h["total"] for h in res.history if "total" in h],
                   "world": int(os.environ["WORLD_SIZE"])}, f)
    torch.distributed.destroy_process_group()
''')


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_torchrun_ddp_two_processes_cpu(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((out / "rank0.json").read_text())
    r1 = json.loads((out / "rank1.json").read_text())
    assert r0["world"] == r1["world"] == 2
    assert r0["params"] == r1["params"] and r0["sum"] == r1["sum"]  # gradients were all-reduced
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 4  # logged terms are averaged over ranks
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-00000002", "checkpoint-00000004"]
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # one writer
    meta = json.loads((out / "checkpoint-00000004" / "meta.json").read_text())
    assert meta["config"]["world_size"] == 2
