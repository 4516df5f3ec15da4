"""What a run writes of its command line, so that both tools can run it again.

``hyperparameters.yaml`` (in ``final/`` and every ``step-*``, as upstream writes it) holds only the flags litgpt's own
``finetune_lora`` knows, so ``litgpt finetune_lora --config OUT_DIR/final/hyperparameters.yaml`` accepts it. The flags
this tool adds go to ``OUT_DIR/seq.yaml``; ``finetune_lora.py --config .../hyperparameters.yaml --config
OUT_DIR/seq.yaml`` runs the same again (``--resume`` is left out: whether to resume is the rerun's choice).
"""

from __future__ import annotations

from pathlib import Path

import yaml

SEQ_CONFIG = "seq.yaml"
OWN_GROUPS = ("seq", "resume", "config")  # not litgpt finetune_lora's


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
