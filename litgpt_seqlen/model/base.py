"""The base model: its checkpoint directory (downloaded as upstream does when it names a Hub model), checked for the
files this run reads, and what bitsandbytes' optimizers need of it."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

import torch
import yaml
from litgpt import utils as litgpt_utils
from litgpt.config import Config
from litgpt.tokenizer import Tokenizer

from litgpt_seqlen.errors import UserInputError


def find_checkpoint_dir(checkpoint_dir: Path, access_token: str | None, need_weights: bool) -> Path:
    """The checkpoint directory, downloaded when it names a Hub model; it must hold what this run reads."""
    if not checkpoint_dir.is_dir() and litgpt_utils.extend_checkpoint_dir(checkpoint_dir).is_dir():
        checkpoint_dir = litgpt_utils.extend_checkpoint_dir(checkpoint_dir)  # a name under checkpoints/, as upstream
    elif not checkpoint_dir.is_dir():
        if not _downloadable(checkpoint_dir):
            raise UserInputError(not_a_checkpoint(checkpoint_dir))
        try:
            checkpoint_dir = litgpt_utils.auto_download_checkpoint(
                model_name=checkpoint_dir, access_token=access_token, ignore_tokenizer_files=True
            )
        except (ValueError, OSError) as problem:  # no network (requests' errors are OSErrors), a refused download
            reason = " ".join(str(problem).split()).rstrip(".")
            raise UserInputError(
                f"checkpoint_dir {str(checkpoint_dir)!r} is not a directory and could not be downloaded ({reason})."
            ) from None
    has_tokenizer = (checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "tokenizer.model").is_file()
    missing = [
        name
        for name, present in (
            ("model_config.yaml", (checkpoint_dir / "model_config.yaml").is_file()),
            ("tokenizer.json or tokenizer.model", has_tokenizer),
            ("lit_model.pth", (checkpoint_dir / "lit_model.pth").is_file() or not need_weights),
        )
        if not present
    ]
    if missing:
        dry_run_hint = " (--seq.dry_run true needs no lit_model.pth)" if missing == ["lit_model.pth"] else ""
        raise UserInputError(f"checkpoint_dir {str(checkpoint_dir)!r} is missing {', '.join(missing)}{dry_run_hint}.")
    return checkpoint_dir


def _downloadable_names() -> list[str]:
    """The Hub names (``org/name``) litgpt's download knows, as ``litgpt download list`` prints them."""
    from litgpt.config import configs

    return [f"{config['hf_config']['org']}/{config['hf_config']['name']}" for config in configs]


def _outside_checkpoints(checkpoint_dir: Path) -> bool:
    """A relative path not under checkpoints/: litgpt looks for it under checkpoints/ too, or downloads it."""
    return not checkpoint_dir.is_absolute() and checkpoint_dir.parts[:1] != ("checkpoints",)


def _downloadable(checkpoint_dir: Path) -> bool:
    """Whether upstream would download ``checkpoint_dir``: a model litgpt knows (any other name it only reports as
    unsupported, and then stops on the missing files)."""
    return _outside_checkpoints(checkpoint_dir) and str(checkpoint_dir) in _downloadable_names()


def not_a_checkpoint(checkpoint_dir: Path) -> str:
    """A checkpoint_dir that is neither a directory nor a model to download, with the closest checkpoint directory
    (beside the path given, or under checkpoints/) or model name."""
    parent = checkpoint_dir.parent
    while not parent.is_dir() and parent != parent.parent:
        parent = parent.parent
    near = list(parent.iterdir()) if parent.is_dir() else []
    found = [str(path) for path in [*near, *Path("checkpoints").glob("*/*")] if (path / "model_config.yaml").is_file()]
    candidates = found + _downloadable_names()
    close = difflib.get_close_matches(str(checkpoint_dir), candidates, n=1)
    also = f" (nor is {Path('checkpoints') / checkpoint_dir})" if _outside_checkpoints(checkpoint_dir) else ""
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"checkpoint_dir {str(checkpoint_dir)!r} is not a directory{also}, nor a model litgpt can download (litgpt"
        f" download list names those).{hint}"
    )


def load_config(checkpoint_dir: Path, config_class: type = Config, **method_settings) -> Config:
    """``config_class`` (the method's litgpt Config) from ``model_config.yaml`` with the method's flags, or a
    ``UserInputError`` naming the file and what is wrong with it (not YAML, not a mapping, keys litgpt does not know)."""
    path = checkpoint_dir / "model_config.yaml"
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as problem:
        reason = " ".join(str(problem).split())
        raise UserInputError(f"{path} is not valid YAML ({reason}). Restore it from the model's checkpoint.") from None
    if not isinstance(settings, dict) or not settings:
        raise UserInputError(f"{path} holds no model settings (a mapping of Config fields). Restore it.")
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(str(key) for key in settings if key not in known)
    if unknown:
        from importlib.metadata import version

        raise UserInputError(
            f"{path} has key(s) the installed litgpt {version('litgpt')} does not know: {', '.join(unknown)}. Remove"
            " them, or install the litgpt version that wrote the checkpoint (or convert it again with this one)."
        )
    try:
        return config_class(**{**settings, **method_settings})
    except (TypeError, ValueError) as problem:  # a value of the wrong kind, met in Config.__post_init__
        raise UserInputError(f"{path} holds a setting litgpt cannot use: {problem}. Fix or restore it.") from None


def check_tokenizer(checkpoint_dir: Path, config: Config, make_tokenizer=Tokenizer) -> None:
    """The tokenizer loads (``make_tokenizer``: the class the run builds it with), and every id it can give has a row
    in the model's embedding (``padded_vocab_size``): from the tokenizer and the config alone, before any weight."""
    try:
        tokenizer = make_tokenizer(checkpoint_dir)
    except Exception:  # the tokenizers binding raises a plain Exception: a file that is not JSON is named here
        _check_tokenizer_json(checkpoint_dir)
        raise
    if not isinstance(tokenizer, Tokenizer):  # another tokenizer class: its ids are its own business
        return
    largest = _largest_token_id(tokenizer)
    if largest >= config.padded_vocab_size:
        file = "tokenizer.json" if tokenizer.backend == "huggingface" else "tokenizer.model"
        raise UserInputError(
            f"the tokenizer in {checkpoint_dir} ({file}) has token ids up to {largest}, but the model has embeddings"
            f" for ids below {config.padded_vocab_size} only (padded_vocab_size in model_config.yaml). Use the"
            " tokenizer that came with these weights."
        )


def _check_tokenizer_json(checkpoint_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):  # read as JSON by litgpt's Tokenizer
        path = checkpoint_dir / name
        if not path.is_file():  # no tokenizer.json: a SentencePiece tokenizer.model
            continue
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as problem:
            raise UserInputError(
                f"{path} is not valid JSON: {problem.msg} at line {problem.lineno}, column {problem.colno}."
                " Restore the tokenizer files from the model's checkpoint (they come with its weights)."
            ) from None
        except UnicodeDecodeError:
            raise UserInputError(
                f"{path} is not UTF-8 text. Restore the tokenizer files from the model's checkpoint."
            ) from None


def _largest_token_id(tokenizer: Tokenizer) -> int:
    if tokenizer.backend == "huggingface":
        ids = list(tokenizer.processor.get_vocab(with_added_tokens=True).values())
    else:
        ids = [tokenizer.processor.vocab_size() - 1]
    ids += [i for i in (tokenizer.bos_id, tokenizer.eos_id) if isinstance(i, int)]
    return max(ids, default=-1)


def swap_in_stable_embedding(model) -> None:
    """bitsandbytes' 8-bit optimizers want a StableEmbedding in place of the token embedding."""
    from bitsandbytes.nn import StableEmbedding

    old = model.transformer.wte
    new = StableEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.transformer.wte = new.to(device=old.weight.device, dtype=old.weight.dtype)
