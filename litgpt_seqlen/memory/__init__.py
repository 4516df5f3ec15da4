"""Memory: the micro-batch size that fits, found by the rehearsal before the first step (``search``), with every rank
held to the memory the tightest rank has free while it looks (``limits``)."""
