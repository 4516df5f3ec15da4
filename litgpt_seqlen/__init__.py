"""The parts of ``finetune_lora.py``, one room per job: ``cli``, ``data``, ``model``, ``training``, ``run``,
``checkpoint``, ``report``; ``errors`` and ``ranks`` are shared by all of them. ``data_utils`` (top level) holds the
length logic over plain values."""
