"""`polytool adapt`: a new task learned from a few examples by training only its routing (MHR-z).

    data.py     the JSONL examples: read, validated (line numbers), tokenised, batched
    model.py    the base with polytool's PolyModel, one task appended, what trains
    train.py    the training loop and the held-out loss
    write.py    the grown adapter, PEFT's format, written atomically with its provenance
    command.py  AdaptOptions and adapt(options, progress): the command's logic
"""
