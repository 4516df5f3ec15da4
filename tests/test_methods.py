"""Every fine-tuning method through the one flow: adapter, adapter v2 and full fine-tuning (LoRA has the other test
files) with the length problems upstream's scripts die of, a dry run, litgpt's own generate scripts on final/, two
ranks, and a run stopped by SIGTERM that resumes bit-identical to one never interrupted."""

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import assets
from helpers import ROOT, cli_args, litgpt_here, read_report, stopped_by_sigterm_after_step_one
from litgpt_seqlen.methods import METHODS

pytestmark = pytest.mark.e2e

OTHER_METHODS = ["adapter", "adapter_v2", "full"]
RESPONSE = "### Response:"
# litgpt's own generate script for each method's final/ (`litgpt generate` reads a full model's lit_model.pth)
GENERATE = {
    "adapter": lambda base, final: [
        "generate_adapter",
        str(base),
        "--adapter_path",
        str(final / "lit_model.pth.adapter"),
    ],
    "adapter_v2": lambda base, final: [
        "generate_adapter_v2",
        str(base),
        "--adapter_path",
        str(final / "lit_model.pth.adapter_v2"),
    ],
    "full": lambda base, final: ["generate", str(final)],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint per method: for the adapters with adapters from the first layer (in model_config.yaml, as
    litgpt reads it; its default, 2, would leave a 2-layer model nothing to train). Its prompt style is Alpaca's and
    its tokenizer decodes the response marker as written: litgpt's adapter generate scripts split their output on it."""
    from litgpt.prompts import Alpaca, save_prompt_style
    from tokenizers import Tokenizer

    base = tmp_path_factory.mktemp("methods_checkpoint")
    assets.build_tokenizer(base, extra_words=[RESPONSE])
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.add_tokens([RESPONSE])  # its id stays the word's: the vocabulary does not grow
    tokenizer.save(str(base / "tokenizer.json"))
    save_prompt_style(Alpaca(), base)
    assets.build_checkpoint(base, block_size=512)
    adapted = tmp_path_factory.mktemp("adapter_checkpoint")
    shutil.copytree(base, adapted, dirs_exist_ok=True)
    config = yaml.safe_load((base / "model_config.yaml").read_text())
    (adapted / "model_config.yaml").write_text(yaml.safe_dump({**config, "adapter_start_layer": 0}))
    return {"adapter": adapted, "adapter_v2": adapted, "full": base}


def trained_weights(out_dir: Path, method: str, where: str = "final") -> dict:
    return torch.load(out_dir / where / METHODS[method].weights_file, weights_only=True)["model"]


@pytest.mark.parametrize("method", OTHER_METHODS)
def test_val_longer_than_train_and_a_sample_over_block_size_train(method, checkpoints, cli_argv, tmp_path, monkeypatch):
    """Upstream sizes the model from the longest sample with no margin and crashes on one over block_size after the
    weights are loaded. Here the val sample sets the length and the over-long train sample is truncated."""
    checkpoint = checkpoints[method]
    data = tmp_path / "data"
    assets.build_data(data, checkpoint, [60, 80, 100, 600], [300])
    out = tmp_path / "out"
    command = f"finetune_{method}"
    result = cli_argv(["litgpt-seqlen", command, str(checkpoint), *cli_args(data, out, "--train.max_steps", "2")])
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_report(out)
    assert report["max_seq_length"] == 512 and report["splits"]["train"]["max"] == 600
    assert yaml.safe_load((out / "final" / "hyperparameters.yaml").read_text())["train"]["max_seq_length"] == 512
    weights = trained_weights(out, method)
    trained = [name for name in weights if METHODS[method].trainable(name, None)]
    assert trained == list(weights)  # the file holds what the method trains, nothing else
    base = torch.load(checkpoint / "lit_model.pth", weights_only=True)
    if method == "full":
        assert weights.keys() == base.keys() and any(not torch.equal(weights[k], base[k]) for k in base)

    generate = [*GENERATE[method](checkpoint, out / "final"), "--prompt", "write a poem", "--max_new_tokens", "3"]
    assert litgpt_here(monkeypatch, *generate) == 0

    dry = cli_argv(
        ["litgpt-seqlen", command, str(checkpoint), *cli_args(data, tmp_path / "dry", "--seq.dry_run", "true")]
    )
    assert dry.returncode == 0 and not (tmp_path / "dry" / "final").exists()
    assert read_report(tmp_path / "dry")["max_seq_length"] == 512


TWO_RANKS = (
    "--devices",
    "2",
    "--train.micro_batch_size",
    "1",
    "--train.global_batch_size",
    "4",
    "--train.epochs",
    "1",
    "--train.save_interval",
    "1",
    "--eval.interval",
    "2",
    "--eval.max_new_tokens",
    "2",
)


def two_rank_command(method, checkpoint, data, out_dir, *flags) -> list[str]:
    flags = cli_args(data, out_dir, *TWO_RANKS, *flags, steps=None)
    return [sys.executable, str(ROOT / "finetune_lora.py"), f"finetune_{method}", str(checkpoint), *flags]


# With `make test-slow`: each takes ~25 s of the 2.5 minutes `make test` may take; LoRA's two-rank SIGTERM and resume
# (tests/test_two_ranks.py) runs in `make test`, through the same sharding, checkpointer and resume code.
TWO_RANK_CASES = [pytest.param(m, marks=[pytest.mark.slow]) for m in OTHER_METHODS]


@pytest.mark.parametrize("method", TWO_RANK_CASES)
def test_two_ranks_sigterm_and_resume_bit_identical(method, checkpoints, tmp_path):
    checkpoint = checkpoints[method]
    data = tmp_path / "data"
    assets.build_data(data, checkpoint, [60, 80, 100, 120, 140, 160, 70, 90, 110, 130, 150, 65], [60, 90])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = lambda out, *flags: subprocess.run(
        two_rank_command(method, checkpoint, data, out, *flags), capture_output=True, text=True, env=env, timeout=300
    )
    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    interrupted = tmp_path / "interrupted"
    stopped = stopped_by_sigterm_after_step_one(two_rank_command(method, checkpoint, data, interrupted))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert not (interrupted / "final").exists()

    resumed = run(interrupted, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed at step" in resumed.stdout
    expected, got = trained_weights(tmp_path / "whole", method), trained_weights(interrupted, method)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_adapters_with_nothing_to_train_are_refused_before_any_weight(checkpoints, cli_argv, tmp_path):
    """litgpt's default adapter_start_layer (2) on a 2-layer model: no adapter anywhere. Refused from the config, with
    the setting to change, before lit_model.pth is read (here it is not even a model)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(checkpoints["full"], checkpoint)  # no adapter_start_layer: litgpt's default
    (checkpoint / "lit_model.pth").write_bytes(b"not a model")
    data = tmp_path / "data"
    assets.build_data(data, checkpoint, [60, 80], [70])
    result = cli_argv(["litgpt-seqlen", "finetune_adapter", str(checkpoint), *cli_args(data, tmp_path / "out")])
    assert result.returncode == 2
    assert "finetune_adapter would train no parameter" in result.stderr and "adapter_start_layer 2" in result.stderr


@pytest.mark.parametrize("method", OTHER_METHODS)
@pytest.mark.parametrize("path", ["segments", "dense"])
def test_packed_rows_train_every_method_as_one_by_one(method, path):
    """Packing under each method's own GPT (the adapters' prefix attention, adapter v2's scaled and biased linear
    layers, full fine-tuning's every parameter): per-token losses and the gradients of every trained parameter equal
    those of the samples run one by one through litgpt's forward."""
    from test_packing import EXACT, family_config, gradient_tolerance, one_by_one, packed, samples_and_rows

    from litgpt_seqlen.model.packed_forward import packed_gpt

    chosen = METHODS[method]
    llama = family_config("llama")  # a shrunk Llama 3.2 (GQA, llama3 rope scaling), as LoRA's packing tests use
    names = [
        field.name for field in dataclasses.fields(chosen.config_class) if field.init and hasattr(llama, field.name)
    ]
    settings = {name: getattr(llama, name) for name in names if name != "adapter_start_layer"}
    config = chosen.config_class(**settings, **({"adapter_start_layer": 0} if method != "full" else {}))
    torch.manual_seed(0)
    model = packed_gpt(chosen.gpt_class)(config, path).double()
    with torch.no_grad():  # the adapters' gates start at zero: random values everywhere make every gradient count
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    chosen.prepare(model)
    chosen.mark_trainable(model)
    model.train()
    items, rows = samples_and_rows()
    reference_losses, reference_gradients = one_by_one(model, items)
    losses, gradients, _ = packed(model, items, rows)
    for reference, loss in zip(reference_losses, losses):
        torch.testing.assert_close(loss, reference, **EXACT)
    assert gradients.keys() == reference_gradients.keys() and gradients
    for key, reference in reference_gradients.items():
        assert reference.abs().sum() > 0, key
        torch.testing.assert_close(gradients[key], reference, **gradient_tolerance(key), msg=key)
