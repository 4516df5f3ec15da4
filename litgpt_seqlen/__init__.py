"""The parts of ``finetune_lora.py``, one room per job (docs/architecture.md has the table): ``methods``, ``cli``,
``settings``, ``out_dir``, ``data``, ``model``, ``training``, ``memory``, ``checkpoint``, ``report``, ``exits``;
``errors``, ``args``, ``ranks`` and ``devices`` are small modules shared by them. ``data_utils`` (top level) holds the
length logic over plain values."""
