"""Models, each with a frozen dataclass config and named presets; they know nothing of
training loops.

    synthetic.py        the spectral-normalised layer of the synthetic study (appendix §4.1)
    mdeq.py             MDEQ: tiny (the ablations), large (CIFAR-10), small (ImageNet)
    deq_transformer.py  the DEQ-Transformer language model (DEQ-Sequence v2)
    ignn.py             IGNN, the implicit graph network
    presets.py          a config from a run's ``model:`` block: a named preset plus overrides
"""
