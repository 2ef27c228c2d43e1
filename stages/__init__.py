"""Pure per-tensor stages: tensors in, tensors out; no I/O, no globals, no device choice.

One module per stage, imported where it is used: ``diff`` (the fp32 weight delta), ``lowrank``
(factors through a kernel of ``loraforge.kernels.SVD_METHODS``), ``cast`` (to the output
dtype) and ``merge`` (a base weight plus LoRA deltas)."""

if __name__ == "stages":  # a bare `import stages` from the checkout root: not us
    from loraforge._checkout import step_aside

    step_aside(__name__, __file__)
