"""``pyquant bench decode``: the smoke mode runs every variant through build/quantize/generate on the CPU and writes
nothing; without a GPU the real run refuses before measuring or writing anything."""
import pytest
import torch

from pyquant.bench import common, decode
from pyquant.cli import main


def _listing():
    d = common.RESULTS_DIR
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_decode_smoke_runs_every_variant_and_writes_nothing(capsys):
    before = _listing()
    assert main(["bench", "decode", "--smoke"]) == 0
    out = capsys.readouterr().out
    for v in decode.VARIANTS:
        for b in (1, 2):
            assert any(line.startswith("smoke") and f" {v} " in line and f"B={b} " in line and "tok/s" in line
                       for line in out.splitlines()), (v, b, out)
    assert "6/6 (variant, batch) runs decoded every token" in out and "nothing written" in out
    assert _listing() == before


def test_decode_weight_bytes_packed_much_smaller():
    cfg = decode.DecodeBenchConfig(models=("smoke",))
    shape = dict(decode.SMOKE_MODEL, intermediate_size=256, hidden_size=128)
    fp = decode.weight_bytes(decode.build_model(shape, "bf16", cfg, "cpu"))
    pk = decode.weight_bytes(decode.build_model(shape, "ternary", cfg, "cpu"))
    assert pk[1] < 0.15 * fp[1]  # block linears: 2 bits + per-row scales vs 16 bits
    assert pk[0] < fp[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_decode_refuses_without_gpu():
    before = _listing()
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["bench", "decode", "--models", "llama3.2-1b", "--batch", "1"])
    assert _listing() == before


def test_decode_bad_config():
    with pytest.raises(ValueError, match="new_tokens"):
        decode.DecodeBenchConfig(new_tokens=1)
    with pytest.raises(ValueError, match="variants"):
        decode.DecodeBenchConfig(variants=("fp8",))


@pytest.mark.gpu
def test_decode_compiled_static_cache_on_gpu_matches_eager():
    """The GPU path (static cache + torch.compile / CUDA graphs) on a small config: every variant decodes, and the
    compiled greedy tokens equal the eager ones."""
    cfg = decode.DecodeBenchConfig(models=("smoke",), prompt_len=16, new_tokens=8, repeats=1)
    for v in decode.VARIANTS:
        m = decode.build_model(decode.SMOKE_MODEL, v, cfg, "cuda")
        ids = torch.randint(1, 256, (2, 16), device="cuda")
        with torch.no_grad():
            eager = decode._generate(m, ids, 8, compile=False)
            comp = decode._generate(m, ids, 8, compile=True)
        assert torch.equal(eager, comp), v
        r = decode.measure(m, 2, cfg, "cuda")
        assert r["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0
