"""The experiments: datasets (a config file each), arms (config overrides) and sweeps (named lists of arms).

An arm is applied on top of a dataset's CPU profile; every arm of a (dataset, seed) shares one phase-0
segmenter (`--config.pretrain.checkpoint`), so arms differ only in what they test. The phase-0 segmenter
itself is the arm `segmenter`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Dataset:
  config: str  # config file
  arg: str  # config-file argument (profile)
  overrides: tuple[str, ...] = ()


DATASETS = {
    # The experiments' synthetic profile: 300 + 1000 steps, validation and checkpoints every 175 steps, pinned
    # here so that the quick-start config (synthetic.py, 200 phase-1 steps) can change without changing them.
    'synthetic': Dataset('configs/synthetic.py', '', ('--config.data.datasets=synthetic_lesions/eval1k',
                                                      '--config.train.num_steps=1000',
                                                      '--config.train.eval_every_steps=175',
                                                      '--config.train.checkpoint_every_steps=175')),
    'kvasir_seg': Dataset('configs/polyp.py', 'cpu'),
    'busi': Dataset('configs/breast.py', 'cpu'),
    'ph2': Dataset('configs/skin.py', 'cpu', ('--config.data.datasets=ph2',)),
    'lgg_brain_mri': Dataset('configs/brain.py', 'cpu'),
    'ddti_thyroid_us': Dataset('configs/thyroid.py', 'cpu'),
    'unified': Dataset('configs/unified.py', 'cpu'),
}
UNIFIED_MEMBERS = ('kvasir_seg', 'ph2', 'busi', 'lgg_brain_mri', 'ddti_thyroid_us')


@dataclasses.dataclass(frozen=True)
class Arm:
  tokens: tuple[str, ...] = ()  # config-file argument tokens (stage presets, scratch/frozen/finetune)
  overrides: tuple[str, ...] = ()  # --config.x=y
  shared_phase0: bool = True  # False: no phase 0 (scratch); its steps are added to phase 1
  # Phase-1 (and phase-0) steps x this, rounded: the unified question at equal total compute, either the unified
  # model x5 or each per-dataset model /5 (five of them then cost one unified model at the profile's steps).
  steps_scale: float = 1.0
  only_dataset: str | None = None
  # Trained once as that arm: the two must resolve to the same config but for `sampling.*` (the runner checks);
  # this arm then evaluates that arm's checkpoint with its own sampling. The checkpoint is the one that arm's
  # validation Dice chose, at that arm's sampler; run.json and the page say so.
  trains_as: str | None = None
  # A phase-0 segmenter alone (`--mode=pretrain`, no phase 1), trained for phase 0's plus phase 1's steps: the
  # control for "the diffusion model beats its own segmenter" that gives the segmenter the same step budget.
  segmenter_only: bool = False
  # This fraction of phase 1's steps is spent on a longer phase 0 of the arm's own instead (equal total gradient
  # steps): does the diffusion phase add anything on top of a well-trained segmenter?
  phase0_share_of_phase1: float = 0.0
  # With `phase0_share_of_phase1`: use that arm's longer phase 0 instead of training one of the same kind again,
  # so the two arms differ only in phase 1 and pair on the same segmenter (the runner checks the shares agree).
  phase0_like: str | None = None


def _stages(table: str) -> str:
  return f'--config.diffusion.stages={table}'


# The tables are written out (not taken from configs/default.py) so that the arms measured with them stay
# what they were if the default table changes.
_BCE_X0 = _stages('500:1000 x0 loss=bce_dice steps=1; 200:500 v steps=4; 0:200 eps steps=5')
_X0_ONLY_BCE = _stages('0:1000 x0 loss=bce_dice steps=10')
_ANCHOR = ('--config.pretrain.coarse_logits=True', '--config.model.self_condition=True', _BCE_X0,
           '--config.loss.aux_weight=1.0')
_DDIM2 = '--config.sampling.ddim_steps=2'  # with the default's sampler (ddim)
_HIGH_T = (_stages('900:1000 x0 loss=bce_dice steps=1; 0:900 x0 loss=bce_dice steps=9'),
           '--config.diffusion.timestep_sampling=balanced')  # x0_high_t, below
_LR1 = '--config.pretrain.finetune_lr_multiplier=1.0'  # the pre-trained encoder at the full rate, not 0.1x
_PLAIN = ('plain', 'three_stage')  # the method before the anchored default (configs/default.py)


ARMS = {
    # the configuration's own defaults, whatever they are at the commit that runs them (since the second change
    # of 2026-11-27 the anchored method with the x0-only table, sampled with 1 DDIM step; a run records its
    # resolved config, so the page sees a change). Its training is the `anchored_x0` arm's (they differ only in
    # the sampler), so it is trained once; if the default's training changes, the runner stops with the fields
    # that differ and this link must go.
    'default': Arm(trains_as='anchored_x0'),
    # targets, inside the default method (equal steps; evaluated at the 2 DDIM steps (2 NFE) that the default
    # used when these arms were designed, and each at its own validation-chosen budget)
    'eps_only': Arm(overrides=(_stages('0:1000 eps steps=10'), _DDIM2)),
    'x0_only': Arm(overrides=(_X0_ONLY_BCE, _DDIM2), trains_as='anchored_x0'),  # the default's model at 2 steps
    'v_only': Arm(overrides=(_stages('0:1000 v steps=10'), _DDIM2)),
    'two_stage': Arm(overrides=(_stages('500:1000 x0 loss=bce_dice steps=1; 0:500 eps steps=9'), _DDIM2)),
    # the default earlier on 2026-11-27: the anchored method with the three-stage table, 2 DDIM steps
    'three_stage_anchored': Arm(overrides=(_BCE_X0, _DDIM2), trains_as='anchored'),
    # the plain method's targets and encoder arms (equal steps, equal NFE: 10 per image, staged sampler)
    'three_stage': Arm(_PLAIN),
    'scratch': Arm(_PLAIN + ('scratch',), shared_phase0=False),
    'finetune': Arm(_PLAIN + ('finetune',)),
    'finetune_coarse': Arm(_PLAIN + ('finetune',), ('--config.pretrain.coarse_logits=True',)),
    # encoder, inside the default method (which fine-tunes)
    'default_scratch': Arm(('scratch',), shared_phase0=False),
    'default_frozen': Arm(('frozen',)),
    # the default fine-tunes its pre-trained encoder at 0.1x the learning rate; here at the full rate (on
    # synthetic the scratch arm, encoder and denoiser trained together at the full rate, beat the default)
    'default_encoder_lr1': Arm(overrides=(_LR1,)),
    # method (issue: make the diffusion model earn its place), one change at a time from the plain method,
    # then together; `anchored` is the bundle with the staged sampler, as it was measured before it became
    # the default.
    'coarse': Arm(_PLAIN, ('--config.pretrain.coarse_logits=True',)),
    'selfcond': Arm(_PLAIN, ('--config.model.self_condition=True',)),
    'recycling': Arm(_PLAIN, ('--config.train.recycling=0.5',)),
    'bce_x0': Arm(_PLAIN, (_BCE_X0, '--config.loss.aux_weight=1.0')),
    'mask_scale_0.3': Arm(_PLAIN, ('--config.diffusion.mask_scale=0.3',)),
    'anchored': Arm(_PLAIN + ('finetune',), _ANCHOR),
    'anchored_x0': Arm(('plain', 'x0_only', 'finetune'), ('--config.pretrain.coarse_logits=True',
                                                            '--config.model.self_condition=True', _X0_ONLY_BCE,
                                                            '--config.loss.aux_weight=1.0')),
    # control: the segmenter trained as long as phase 0 + phase 1 together (equal gradient steps)
    'segmenter_long': Arm(shared_phase0=False, segmenter_only=True),
    # the default on top of a longer phase 0: 70 % of phase 1's steps moved to phase 0 (synthetic: 1 000 + 300,
    # Kvasir-SEG and BUSI: 2 750 + 750), the same total steps as segmenter_long
    'default_long_phase0': Arm(shared_phase0=False, phase0_share_of_phase1=0.7),
    # the two changes that came closest to the long segmenter, together: the longer phase 0 of
    # `default_long_phase0` (the same checkpoint), its 30 % of phase 1 trained like `x0_high_t`
    'long_phase0_high_t': Arm(overrides=_HIGH_T, shared_phase0=False, phase0_share_of_phase1=0.7,
                              phase0_like='default_long_phase0'),
    # the default trained where it samples: its one DDIM step evaluates at t = 999, where x_t is pure noise up to
    # sqrt(alpha_bar) = 0.006 of the mask, but uniform t spends two thirds of training where sqrt(alpha_bar) > 0.1
    # and x_t shows the mask. Two x0 stages drawn half and half (`balanced`): half the batch at t >= 900
    # (sqrt(alpha_bar) <= 0.017), so the network is mostly a refiner of the segmenter's logits with noise as its
    # input (the ledger's refiner control).
    'x0_high_t': Arm(overrides=_HIGH_T),
    # the x0_high_t training on the two encoders that tied the long segmenter on synthetic: the full-rate
    # fine-tuned encoder, and no phase 0 at all (encoder and denoiser trained together for phase 0 + 1 steps)
    'lr1_high_t': Arm(overrides=(_LR1,) + _HIGH_T),
    'scratch_high_t': Arm(('scratch',), _HIGH_T, shared_phase0=False),
    # unified: one default model over the five real sets, at the steps of one per-dataset model and at their sum.
    'unified_equal_steps': Arm(only_dataset='unified'),
    # the same with the plain method (three stages, frozen encoder): the unified run before the anchored default
    'unified_equal_steps_plain': Arm(_PLAIN, only_dataset='unified'),
    'unified_equal_compute': Arm(shared_phase0=False, steps_scale=len(UNIFIED_MEMBERS), only_dataset='unified'),
    # the other way to equal total compute: one default model per dataset at a fifth of the steps (phase 0 and
    # phase 1, its own phase 0), so the five cost what `unified_equal_steps` costs: affordable where x5 is not
    'default_fifth_steps': Arm(shared_phase0=False, steps_scale=1 / len(UNIFIED_MEMBERS)),
}


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  question: str
  arms: tuple[tuple[str, str], ...]  # (label, arm name)
  reference: str
  datasets: tuple[str, ...]
  # Each phase-1 arm also gets the budget grid on the validation split and one test run at its best setting.
  budget: bool = False
  # Arms every other arm is also compared with (besides the reference and the segmenter).
  also_vs: tuple[str, ...] = ()


_DECIDE = ('synthetic', 'kvasir_seg', 'busi')
SWEEPS = {
    'targets': Sweep('targets', 'Inside the default method, does the staged target table beat a single target '
                     '(equal steps, equal NFE)?',
                     (('eps only', 'eps_only'), ('x0 only, 2 steps', 'x0_only'), ('v only', 'v_only'),
                      ('two stages', 'two_stage'), ('three stages (earlier default)', 'three_stage_anchored'),
                      ('x0 only, 1 step (default)', 'default')), 'eps_only', _DECIDE,
                     # a few-step DDIM favours tables that start with x0: each arm picks its own budget
                     budget=True, also_vs=('default', 'three_stage_anchored')),
    'encoder': Sweep('encoder', 'Does the segmentation pre-training help (equal gradient steps)?',
                     (('scratch', 'default_scratch'), ('frozen', 'default_frozen'),
                      ('fine-tuned (default)', 'default'),
                      ('fine-tuned at the full learning rate', 'default_encoder_lr1')), 'default_scratch', _DECIDE,
                     also_vs=('default',)),
    'encoder_plain': Sweep('encoder_plain', 'In the plain method, does the segmentation pre-training help?',
                           (('scratch', 'scratch'), ('frozen', 'three_stage'), ('fine-tuned', 'finetune'),
                            ('fine-tuned + coarse logits', 'finetune_coarse')), 'scratch', _DECIDE),
    'method': Sweep('method', 'Which change makes the diffusion model beat its own segmenter?',
                    (('segmenter (phase 0)', 'segmenter'), ('three stages (plain)', 'three_stage'),
                     ('+ coarse logits', 'coarse'), ('+ self-conditioning', 'selfcond'),
                     ('+ recycling', 'recycling'), ('+ BCE-Dice x0 loss', 'bce_x0'),
                     ('+ mask scale 0.3', 'mask_scale_0.3'), ('anchored (all, fine-tuned), staged', 'anchored'),
                     ('anchored, x0 only, staged', 'anchored_x0'),
                     ('anchored, three stages, 2 steps (earlier default)', 'three_stage_anchored'),
                     ('default config', 'default'), ('default, half its training at t >= 900', 'x0_high_t')),
                    # each "+ X" is one change to the plain method: paired with it too (same phase 0)
                    'segmenter', _DECIDE, also_vs=('three_stage',)),
    # The per-dataset model is the default configuration: the `default` arm, which the other sweeps also run;
    # the plain method's per-dataset runs (the default before 2026-11-27) stay beside it.
    # Equal total compute two ways: the unified model at 5x the steps against the per-dataset models, or the
    # unified model at the profile's steps against per-dataset models at 1/5 of them (`also_vs`); the plain
    # method's unified run against the plain per-dataset models.
    'unified': Sweep('unified', 'Does one unified model serve five organs as well as one model per organ?',
                     (('per-dataset model', 'default'), ('per-dataset model, plain method', 'three_stage'),
                      ('per-dataset model, 1/5 of the steps', 'default_fifth_steps'),
                      ('unified, equal steps', 'unified_equal_steps'),
                      ('unified, equal steps, plain method', 'unified_equal_steps_plain'),
                      ('unified, equal total compute', 'unified_equal_compute')), 'default',
                     UNIFIED_MEMBERS + ('unified',), also_vs=('default_fifth_steps', 'three_stage')),
    'control': Sweep('control', 'Is the default\'s gain over its own segmenter more than extra training? (a '
                     'segmenter trained for phase 0 + phase 1 steps, equal gradient steps)',
                     (('segmenter, phase 0 + 1 steps', 'segmenter_long'),
                      ('three stages (earlier default)', 'three_stage_anchored'),
                      ('x0 only, 2 steps (the default\'s model)', 'x0_only'), ('default config', 'default'),
                      ('default on a longer phase 0 (70 % of phase 1\'s steps moved)', 'default_long_phase0'),
                      ('default, half its training at t >= 900 (where it samples)', 'x0_high_t'),
                      ('both: longer phase 0, then half at t >= 900', 'long_phase0_high_t'),
                      ('default, encoder fine-tuned at the full learning rate', 'default_encoder_lr1'),
                      ('default from scratch (no phase 0, its steps added to phase 1)', 'default_scratch'),
                      ('full-rate encoder, half its training at t >= 900', 'lr1_high_t'),
                      ('from scratch, half its training at t >= 900', 'scratch_high_t')),
                     'segmenter_long', _DECIDE, also_vs=('default', 'default_long_phase0', 'default_encoder_lr1')),
    'budget': Sweep('budget', 'Which sampler, NFE and ensemble size (chosen on validation)?',
                    (('default config', 'default'), ('three stages (earlier default)', 'three_stage_anchored'),
                     ('anchored (all, fine-tuned)', 'anchored')), 'segmenter',
                    _DECIDE, budget=True),
}

# The budget sweep: every setting evaluated on the validation split of each arm's checkpoint.
BUDGET_SETTINGS = 'staged,ddim:1,ddim:2,ddim:5,ddim:10,ddim:25,ddpm:10'
BUDGET_ENSEMBLES = '1,3,5'
