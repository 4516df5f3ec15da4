"""What a run writes of its command line, so that both tools can run it again.

``hyperparameters.yaml`` (in ``final/`` and every ``step-*``, as upstream writes it) holds only the flags litgpt's own
script for the method knows, so ``litgpt finetune_lora --config OUT_DIR/final/hyperparameters.yaml`` (or
``finetune_adapter``, ...) accepts it. The flags this tool adds go to ``OUT_DIR/seq.yaml``; ``litgpt-seqlen
finetune_lora --config .../hyperparameters.yaml --config OUT_DIR/seq.yaml`` runs the same again (``--resume`` is left
out: whether to resume is the rerun's choice).
"""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from litgpt_seqlen.cli.parser import build_parser

SEQ_CONFIG = "seq.yaml"
OWN_GROUPS = ("seq", "resume", "config")  # not the flags of litgpt's scripts (finetune_full's resume is the rerun's)


def upstream_part(hyperparameters):
    """The parsed command line without this tool's own flags."""
    upstream = hyperparameters.clone()
    for key in OWN_GROUPS:
        if key in upstream:
            del upstream[key]
    return upstream


def write_seq_config(path: Path, hyperparameters) -> None:
    """The --seq.* group as a config file for a rerun."""
    Path(path).write_text(yaml.safe_dump({"seq": hyperparameters.seq.as_dict()}, sort_keys=False))


def write_hyperparameters(directory: Path, hyperparameters, method) -> None:
    """``directory/hyperparameters.yaml``: the command line as upstream's script for ``method`` writes it."""
    writer(method).save(
        upstream_part(hyperparameters), Path(directory) / "hyperparameters.yaml", overwrite=True, skip_validation=True
    )


@functools.cache
def writer(method):
    """The method's parser, built once per process (building it reads litgpt's signatures and docstrings: ~0.05 s,
    for every checkpoint a run writes)."""
    return build_parser(method)
