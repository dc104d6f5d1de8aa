"""No code runs from a checkpoint: a pickle payload planted in ``trainer_state.pt`` is refused and never executed;
resume stays exact with the safe format (tests/test_train.py covers the bitwise resume); no unsafe loader in pyquant."""
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pyquant.distill import DistillConfig, Distiller
from pyquant.train import data as D
from pyquant.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pyquant.train.loop import TrainConfig, train


class _Payload:
    """Unpickling this object calls ``open(path, "w")``: it creates ``path`` (a harmless stand-in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=29,
                                        max_position_embeddings=32, tie_word_embeddings=False))


def _data(n=8, L=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 29, (L,), generator=g)} for _ in range(n)]


def _cfg(out, **kw):
    return TrainConfig(output_dir=str(out), max_steps=3, batch_size=2, lr=1e-3, progress=False, seed=1, **kw)


def _plant(ckpt: Path, marker: Path) -> None:
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    state["rng"]["python"] = _Payload(marker)
    torch.save(state, ckpt / "trainer_state.pt")


def test_planted_pickle_payload_is_refused_and_never_runs(tmp_path):
    run = tmp_path / "run"
    train(Distiller(_llama(), None, DistillConfig(ce=1.0)), _data(), D.CausalCollator(), _cfg(run, save_every=2))
    shutil.rmtree(run / "checkpoint-00000003")
    ck = run / "checkpoint-00000002"
    marker = tmp_path / "PWNED"
    control = tmp_path / "control"
    shutil.copytree(ck, control)
    _plant(ck, marker)
    # the payload is real: an unsafe load would run it (so the assertion below can fail)
    _plant(control, tmp_path / "control-ran")
    torch.load(control / "trainer_state.pt", weights_only=False)
    assert (tmp_path / "control-ran").exists()

    student = _llama(seed=7)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"refused: trainer_state.pt holds objects other than tensors"):
        train(Distiller(student, None, DistillConfig(ce=1.0)), _data(), D.CausalCollator(),
              _cfg(run, save_every=2, resume=True))
    assert not marker.exists()  # never executed
    for k, v in student.state_dict().items():  # nothing half-loaded
        assert torch.equal(v, before[k]), k
    with pytest.raises(CheckpointError, match="nothing in it was executed"):
        load_checkpoint(ck, _llama())
    assert not marker.exists()


def test_trainer_state_loads_with_weights_only_and_bad_structure_refused(tmp_path):
    m = _llama()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    from transformers import get_scheduler

    sch = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=4)
    m(torch.randint(0, 29, (1, 5)), labels=torch.randint(0, 29, (1, 5))).loss.backward()
    opt.step()
    sch.step()
    p = save_checkpoint(tmp_path, 1, m, opt, sch)
    st = torch.load(p / "trainer_state.pt", weights_only=True)  # the whole state is plain data
    assert set(st) == {"optimizer", "scheduler", "rng"}
    m2 = _llama(3)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    sch2 = get_scheduler("linear", opt2, num_warmup_steps=1, num_training_steps=4)
    load_checkpoint(p, m2, opt2, sch2)
    assert sch2.state_dict() == sch.state_dict()
    a, b = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    torch.save([1, 2, 3], p / "trainer_state.pt")
    with pytest.raises(CheckpointError, match="expected a dict with 'optimizer'"):
        load_checkpoint(p, m2)


_UNSAFE = re.compile(r"weights_only\s*=\s*False|\bpickle\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                     r"trust_remote_code\s*=\s*True|\bmarshal\.loads?\(|\bdill\b|\bcloudpickle\b")


def test_no_unsafe_loader_in_pyquant():
    """Every file pyquant reads goes through safetensors, JSON, text, or ``torch.load(..., weights_only=True)``
    (explicit: torch < 2.6 defaults to weights_only=False); no pickle, eval, exec or remote code."""
    repo = Path(__file__).resolve().parents[1]
    files = sorted((repo / "pyquant").rglob("*.py")) + sorted((repo / "benchmarks").glob("*.py"))
    hits = []
    for f in files:
        text = f.read_text()
        for i, line in enumerate(text.splitlines(), 1):
            if _UNSAFE.search(line):
                hits.append(f"{f.relative_to(repo)}:{i}: {line.strip()}")
        for m in re.finditer(r"torch\.load\(", text):
            call = text[m.start():text.find(")", m.start()) + 200]
            if not re.search(r"weights_only\s*=\s*True", call.split("\n\n")[0]):
                hits.append(f"{f.relative_to(repo)}: torch.load without weights_only=True")
    assert len(files) > 20 and hits == []


_KILL_DURING_SAVE = r"""
import sys, time, torch
from pathlib import Path
import pyquant.train.checkpoint as ck
out = Path(sys.argv[1])
torch.manual_seed(0)
m = torch.nn.Linear(4, 3)
real = ck.torch.save
def slow(obj, f, *a, **k):
    real(obj, f, *a, **k)
    print("WRITING", flush=True)
    time.sleep(120)
ck.torch.save = slow
ck.save_checkpoint(out, 2, m)
"""


def test_checkpoint_write_killed_leaves_previous_checkpoint(tmp_path):
    """SIGKILL in the middle of writing checkpoint 2: checkpoint 1 is intact, no checkpoint 2 exists, and the next
    resume reads checkpoint 1 (the dead write's temporary directory is ignored)."""
    import signal
    import subprocess
    import sys

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3)
    c1 = save_checkpoint(tmp_path, 1, m)
    before = {p.name: p.read_bytes() for p in c1.iterdir()}
    p = subprocess.Popen([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "WRITING"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL
    from pyquant.train.checkpoint import latest_checkpoint, list_checkpoints

    assert [x.name for x in list_checkpoints(tmp_path)] == ["checkpoint-00000001"]
    assert {x.name: x.read_bytes() for x in c1.iterdir()} == before
    assert any(x.name.startswith(".tmp-checkpoint-00000002") for x in tmp_path.iterdir())  # the dead write
    assert latest_checkpoint(tmp_path) == c1
    load_checkpoint(c1, torch.nn.Linear(4, 3))
