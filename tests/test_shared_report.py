"""The report on real data and a real tokenizer, checked against lengths litgpt's own SFTDataset computes."""

import shutil

import numpy as np
import pytest
from litgpt.data import JSON
from litgpt.tokenizer import Tokenizer
from litgpt.utils import save_config

from helpers import SHARED, read_report, shared_assets, tiny_config

pytestmark = [pytest.mark.e2e, shared_assets("the report tests on the real data with the Llama 2 tokenizer")]


@pytest.fixture(scope="module")
def llama2_checkpoint(tmp_path_factory):
    """The real Llama 2 SentencePiece tokenizer beside a model config (block_size 1024); no weights: dry run only."""
    directory = tmp_path_factory.mktemp("llama2")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(SHARED / "tokenizers" / "llama2-sentencepiece" / name, directory)
    save_config(
        tiny_config(
            name="llama2-shaped", block_size=1024, vocab_size=32000, padded_vocab_size=32000, n_head=1, n_embd=8
        ),
        directory,
    )
    return directory


def independent_lengths(checkpoint, data_file, split_fraction):
    """Per split, len(dataset[i]["input_ids"]) from litgpt's JSON module and SFTDataset, untruncated."""
    data = JSON(json_path=data_file, val_split_fraction=split_fraction)
    data.connect(tokenizer=Tokenizer(checkpoint), batch_size=1, max_seq_length=None)
    data.setup()
    return {
        "train": [len(data.train_dataset[i]["input_ids"]) for i in range(len(data.train_dataset))],
        "val": [len(data.test_dataset[i]["input_ids"]) for i in range(len(data.test_dataset))],
    }


@pytest.mark.parametrize("data_name", ["alpaca_en_demo.json", "alpaca_zh_demo.json"])
def test_report_matches_litgpt_sftdataset(cli_here, llama2_checkpoint, tmp_path, data_name):
    data_file = SHARED / "data" / data_name
    out = tmp_path / "out"
    flags = ["--data.val_split_fraction", "0.1", "--train.max_seq_length", "512", "--seq.dry_run", "true"]
    run = cli_here(data_file, out, *flags, checkpoint=llama2_checkpoint)
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_report(out)
    expected = independent_lengths(llama2_checkpoint, data_file, 0.1)
    every = expected["train"] + expected["val"]

    assert report["longest"] == max(every) and report["max_seq_length"] == 512
    for split, lengths in expected.items():
        stats = report["splits"][split]
        assert stats["count"] == len(lengths)
        assert (stats["min"], stats["max"]) == (min(lengths), max(lengths))
        assert lengths[stats["argmax"]] == max(lengths)
        assert stats["mean"] == pytest.approx(np.mean(lengths), abs=0.01)
        for p in (50, 90, 99):
            assert stats[f"p{p}"] == int(np.percentile(lengths, p, method="inverted_cdf"))
        assert stats["over_limit"] == int(np.sum(np.array(lengths) > 512))
        assert stats["tokens_truncated"] == int(np.clip(np.array(lengths) - 512, 0, None).sum())

    what_if = {row["max_seq_length"]: row for row in report["what_if"]}
    for limit in (128, 256, 512, 1024):
        cut = np.clip(np.array(every) - limit, 0, None)
        assert what_if[limit]["samples_cut"] == int((cut > 0).sum())
        assert what_if[limit]["tokens_cut_share"] == pytest.approx(cut.sum() / sum(every))
