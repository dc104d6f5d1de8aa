"""Issue 12 "Bad input": reductions or presets that do not exist, a preset combined with options it contradicts,
CR-ILD on a model whose last layer cannot be captured, co-distillation with a frozen (or otherwise unusable)
teacher -- each a clear ValueError naming the argument, raised before any training step (the checks the other test
files already make are not repeated here: tests/test_paper_fidelity.py::test_preset_bad_input,
::test_distill_reduction_options_bad_input, ::test_qat_glue_cli_bad_options_refused_before_loading,
tests/test_methods.py::test_crild_refuses_uncapturable_and_bad_options (student and teacher), ::test_codistill_refuses_frozen_teacher,
tests/test_attention_kd.py::test_bad_input_raises_clear_errors)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from pyquant.distill import DistillConfig, Distiller


def _bert(seed, num_labels=3, layers=2):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48, vocab_size=97,
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def test_attention_map_reduction_option_and_names_that_do_not_exist():
    from pyquant.distill.attention import attention_map_loss
    from pyquant.distill.capture import attention_kd_losses, capture_attention

    with pytest.raises(ValueError, match=r"attn_map_reduction='sum' is invalid: expected one of \('paper', "
                                         r"'mean_rows'\)"):
        DistillConfig(task="classification", attn_map=1.0, attn_map_reduction="sum")
    s, t = _bert(0), _bert(1)
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(2))
    am = (torch.arange(9)[None, :] < torch.tensor([9, 6, 2])[:, None]).long()
    batch = {"input_ids": ids, "attention_mask": am, "labels": torch.tensor([0, 1, 2])}
    with capture_attention(s) as rs:
        s(input_ids=ids, attention_mask=am)
    with capture_attention(t) as rt, torch.no_grad():
        t(input_ids=ids, attention_mask=am)
    want = {r: sum(attention_map_loss(e.q, e.k, f.q, f.k, e.key_padding_mask, reduction=r) for e, f in zip(rs, rt))
            for r in ("paper", "mean_rows")}
    assert abs(want["paper"] - want["mean_rows"]) > 1e-3 * want["paper"]  # the two differ on unequal lengths
    for r in ("paper", "mean_rows"):  # the Distiller option selects the reduction
        got = Distiller(s, t, DistillConfig(task="classification", ce=0.0, attn_map=1.0, attn_map_reduction=r))(batch)
        torch.testing.assert_close(got.losses["attn_map"], want[r].detach(), rtol=1e-5, atol=1e-8)
    # a misspelt reduction is refused even where the map loss is switched off
    with pytest.raises(ValueError, match="reduction='per_token' is invalid"):
        attention_kd_losses(rs, rt, map_weight=0.0, reduction="per_token")


def test_cli_preset_that_does_not_exist_and_contradicting_quant_options(tmp_path, capsys):
    from test_train import _parse

    from pyquant.train import cli

    with pytest.raises(SystemExit) as e:
        _parse("qat_glue", ["--task", "rte", "--teacher", "x", "--output-dir", str(tmp_path), "--preset", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    base = ["--task", "rte", "--teacher", str(teacher), "--output-dir", str(tmp_path / "o"), "--no-progress",
            "--preset", "kdqat-emnlp22"]
    for extra, flag in ((["--method", "absmean"], "--method"), (["--granularity", "channel"], "--granularity"),
                        (["--group-size", "64"], "--group-size")):
        assert cli.run_qat_glue(_parse("qat_glue", base + extra)) == 2
        err = capsys.readouterr().err
        assert f"{flag} contradicts it" in err and "--preset kdqat-emnlp22" in err
    assert not (tmp_path / "o").exists()


def test_preset_contradicted_by_embedding_or_attention_quant_options():
    from pyquant import QATConfig
    from pyquant.formats import ActivationQuantConfig, WeightQuantConfig

    for kw in ({"embeddings": WeightQuantConfig(method="twn", granularity="tensor")},
               {"attention_activation": ActivationQuantConfig(clip=2.5, granularity="token")}):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"preset='kdqat-emnlp22'\) sets {name}=.*contradicts it"):
            QATConfig(preset="kdqat-emnlp22", **kw)


def test_codistill_refuses_before_training():
    teacher = _bert(3, layers=3)
    teacher.requires_grad_(True)
    with pytest.raises(ValueError, match="teacher num_labels=2 != student num_labels=3"):  # not at the first step
        Distiller(_bert(4), _bert(5, num_labels=2).requires_grad_(True),
                  DistillConfig(task="classification", ce=1.0, kd=1.0, codistill=True))
    for kw, msg in (({"task": "causal_lm"}, "codistill needs task='classification' or 'regression'"),
                    ({"hidden": 1.0}, r"codistill is logit co-distillation: it cannot be combined with \['hidden'\]"),
                    ({"teacher_dtype": "bfloat16"}, r"cannot be combined with \['teacher_dtype'\]"),
                    ({"kd": 0.0}, "codistill needs ce > 0 and kd > 0")):
        args = dict(task="classification", ce=1.0, kd=1.0, codistill=True)
        args.update(kw)
        with pytest.raises(ValueError, match=msg):
            DistillConfig(**args)
    with pytest.raises(ValueError, match="codistill=.* is invalid: expected a bool"):
        DistillConfig(task="classification", ce=1.0, kd=1.0, codistill="yes")
    # a teacher without trainable parameters at all (e.g. a frozen wrapper) is as frozen as requires_grad=False
    with pytest.raises(ValueError, match="the teacher is frozen"):
        Distiller(_bert(6), nn.Identity(), DistillConfig(task="classification", ce=1.0, kd=1.0, codistill=True))
