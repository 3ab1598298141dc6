"""Multi-task loss weighting: how the task losses of one batch become one backward pass.

A :class:`LossWeighting` is handed to the trainer as an object (``Trainer(weighting=...)``).
It knows the tasks and, for gradient surgery, the *shared* parameters; it knows nothing else
about the model. Per training step the trainer calls :meth:`LossWeighting.backward` once; per
epoch it calls :meth:`LossWeighting.start_epoch` with the mean training loss of every
finished epoch. :meth:`LossWeighting.parameters` lists learnable weighting parameters (only
uncertainty weighting and IMTL with ``loss_scale`` have any) that the trainer must add to its
optimizer, without weight decay, and save in its checkpoint through
:meth:`LossWeighting.state_dict`, which also holds every other piece of a scheme's state.

Every scheme multiplies its own weight by the task's recipe weight (1 by default), so a
recipe weight acts as a fixed prior scale on top of the scheme.

=============  ==============================================================  =============
name           weight of task t                                                sum (w = 1)
=============  ==============================================================  =============
uniform        w_t                                                             T
uncertainty    w_t exp(-s_t), plus the regulariser s_t (learned s_t)            -
dwa            w_t T softmax(r / 2)_t, r_t = L_t(e-1) / L_t(e-2)                T
rlw            w_t softmax(z)_t, z ~ N(0, I) drawn every step                  1
pcgrad         w_t, then conflicting shared gradients are projected            T
gradnorm       w_t v_t; v steps on Σ|v_t‖∇L_t‖ - mean(v‖∇L‖) r_t^α|, Σv = T     T
mgda           w_t α_t, α = argmin over the simplex of ‖Σ_t α_t ∇L_t‖           1
graddrop       w_t; each shared gradient element keeps one sign at random      T
imtl           w_t α_t on the shared gradient: equal projection on every u_t   1
gradvac        w_t Σ_i C_it: gradients raised towards EMA cosine targets        ≥ T
famo           w_t z_t / (c L_t), z = softmax(ξ), c = Σ_s z_s / L_s             1
=============  ==============================================================  =============

The gradient schemes (pcgrad, gradnorm, mgda, graddrop, imtl, gradvac) take one backward
pass per task through the shared parameters (all of them, flattened into one vector), then
one through the whole model. Parameters outside ``shared`` (the task heads) get the gradient
of ``Σ_t w_t L_t`` under the surgery schemes (pcgrad, graddrop, imtl, gradvac) and of the
weighted sum with the scheme's weights under the others. A scheme's options are keyword
arguments of its class; the recipe gives them as a table,
``finetune.weighting = { name = "gradnorm", alpha = 1.5 }``.

Example:
    >>> weighting = get_weighting("dwa", tasks, seed=0)
    >>> weighting.start_epoch(epoch, history)           # history: [{task: mean loss}, ...]
    >>> weights = weighting.backward(losses, shared)    # fills .grad; {task: weight used}
"""


from branchnas.weighting._base import (
    WEIGHTINGS,
    LossWeighting,
    get_weighting,
    register_weighting,
    weighting_options,
)
from branchnas.weighting.gradient import (
    IMTL,
    MGDA,
    GradDrop,
    GradNorm,
    GradVac,
    PCGrad,
    drop_signs,
    imtl_alpha,
    min_norm_weights,
    project_conflicting,
)
from branchnas.weighting.loss_based import DWA, FAMO, RLW, UncertaintyWeighting, Uniform

__all__ = [
    "LossWeighting",
    "Uniform",
    "UncertaintyWeighting",
    "DWA",
    "RLW",
    "PCGrad",
    "GradNorm",
    "MGDA",
    "GradDrop",
    "IMTL",
    "GradVac",
    "FAMO",
    "WEIGHTINGS",
    "register_weighting",
    "get_weighting",
    "weighting_options",
    "project_conflicting",
    "min_norm_weights",
    "drop_signs",
    "imtl_alpha",
]
