"""Which objective, judge and attack an application run gets, from its options (each application's
``build`` asks here).

The one place where the generic tasks meet the digits model: a plug-in ``--loss``, a critic folder
(``--classifier``, ``--clip``, ``--backbone``) or the pipeline's own ``safety_checker/`` come first;
the digits model's critics (:mod:`adjointdpm.embedded.digit_objectives`) are used only on a model that ships
them (the embedded model, a folder with ``critics/``, or ``--critics``). On any other model without a
critic option the command stops with one line saying which option to give.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from ..critics.folder_objectives import (BackboneStyle, ClassifierAttack, ClassifierJudge, ClassifierTarget,
                                         ClipJudge, ClipTarget, PluginStyle, PluginTarget, SafetyAttack,
                                         target_label_for_judge)
from .errors import UserInputError

#: each session's critics, loaded once; a session no longer used takes its critics with it
_LOADED_CRITICS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_critics(session):
    """The critics a model folder ships (``critics/``: the digits model's guide, judge, safety filter), loaded at
    first use and kept per session: from ``--critics``, else the folder's own, else the embedded model's."""
    from ..components import ComponentsError
    from ..embedded.critics import load_critics

    if session not in _LOADED_CRITICS:
        if session.critics_path is not None:
            critics = load_critics(session.critics_path, device=session.device)
        else:
            try:
                critics = load_critics(session.model_path, device=session.device)
            except ComponentsError:
                if session.model_path is None:
                    raise
                critics = load_critics(None, device=session.device)
        _LOADED_CRITICS[session] = critics
    return _LOADED_CRITICS[session]


def has_own_critics(session) -> bool:
    """Whether the model ships critics (the embedded model, a folder with critics/) or some were given."""
    return (session.critics_path is not None or session.model_path is None
            or (Path(session.model_path) / "critics").is_dir())


def _needs(session, command: str, options: str) -> None:
    if not has_own_critics(session):
        raise UserInputError(f"{command} on {session.model_path}: give an objective ({options}); the digit "
                             "critics belong to the embedded model")


def plugin(spec: str):
    from ..critics.plugin import CheckedLoss

    return CheckedLoss.from_spec(spec)


def judge_from(session, path, *, target_label=None, text=None, need_labels=False):
    """``--judge PATH``: a classifier (labels; accuracy for ``target_label`` if it names one of its classes) or
    a CLIP model (CLIP score to ``text``, else to each image's prompt)."""
    from ..critics import folder_kind

    if path is None:
        return None
    if folder_kind(path, "--judge") == "clip":
        if need_labels:
            raise UserInputError("--judge for audit must be an image classifier (it must keep its label)")
        from ..critics.clip import Clip

        return ClipJudge(Clip.from_folder(path, session.device, what="--judge"), text)
    from ..critics.classifier import Classifier

    classifier = Classifier.from_folder(path, session.device, what="--judge")
    return ClassifierJudge(classifier, target_label)


def guide_objective(session, options):
    """(target, judge, prompt) of a guide run (``options``: guide's Options)."""
    loss, classifier, clip, clip_prompt = options.loss, options.classifier, options.clip, options.clip_prompt
    target_class, judge, prompt = options.target_class, options.judge, options.prompt
    if sum(x is not None for x in (loss, classifier, clip)) > 1:
        raise UserInputError("give one objective: --loss, --classifier or --clip")
    if loss is not None:
        return PluginTarget(plugin(loss)), judge_from(session, judge, text=clip_prompt), prompt or ""
    if classifier is not None:
        from ..critics import folder_kind
        from ..critics.classifier import Classifier

        if target_class is None:
            raise UserInputError("--classifier needs --target-class (a class index or a label name of its config.id2label)")
        critic = Classifier.from_folder(classifier, session.device)
        target = ClassifierTarget(critic, target_class)
        if judge is not None and folder_kind(judge, "--judge") == "classifier":
            # the judge's accuracy for the same class: its label of the same name, else the same index
            other = Classifier.from_folder(judge, session.device, what="--judge")
            return target, ClassifierJudge(other, target_label_for_judge(other, critic, target.index)), prompt or ""
        return target, judge_from(session, judge, text=clip_prompt or critic.label(target.index)), prompt or ""
    if clip is not None:
        from ..critics.clip import Clip

        text = clip_prompt or prompt
        if not text:
            raise UserInputError("--clip needs --clip-prompt TEXT (the text the images should match)")
        return ClipTarget(Clip.from_folder(clip, session.device), text), judge_from(session, judge, text=text), prompt or ""
    _needs(session, "guide", "--classifier PATH --target-class C, --clip PATH --clip-prompt TEXT, or --loss FILE.py:FUNC")
    from ..embedded.digit_objectives import DigitJudge, DigitTarget, check_digit, digit_prompt

    digit = check_digit(8 if target_class is None else target_class)
    critics = model_critics(session)
    judge_obj = judge_from(session, judge, text=clip_prompt) if judge is not None else DigitJudge(critics, digit, session.device)
    return DigitTarget(critics, digit), judge_obj, prompt if prompt is not None else digit_prompt(session.comps.settings, digit)


def audit_attack(session, options):
    """The attack of an audit run (``options``: audit's Options)."""
    attack, classifier, margin, judge = options.attack, options.classifier, options.margin, options.judge
    if attack not in ("classifier", "safety"):
        raise UserInputError(f"--attack must be classifier or safety, got {attack!r}")
    judge_obj = judge_from(session, judge, need_labels=True)
    if attack == "classifier" and classifier is not None:
        from ..critics.classifier import Classifier

        return ClassifierAttack(Classifier.from_folder(classifier, session.device), judge_obj)
    if attack == "safety" and session.model_path is not None and not has_own_critics(session):
        from ..critics.safety import SafetyChecker

        return SafetyAttack(SafetyChecker.from_pipeline(session.model_path, session.device), margin, judge_obj)
    _needs(session, "audit", "--classifier PATH, or --attack safety on a pipeline folder with safety_checker/")
    from ..embedded.digit_objectives import DigitClassifierAttack, DigitSafetyAttack

    if judge_obj is not None:
        raise UserInputError("--judge: the digits model's attacks use its own judge")
    return DigitClassifierAttack(model_critics(session)) if attack == "classifier" else DigitSafetyAttack(model_critics(session), margin)


def stylize_objective(session, options):
    """(objective factory, judge, prompt pool or None, named references, reference spec) of a stylize run
    (``options``: stylize's Options)."""
    loss, backbone, content_weight = options.loss, options.backbone, options.content_weight
    judge, prompt, reference = options.judge, options.prompt, options.reference
    if loss is not None and backbone is not None:
        raise UserInputError("give one objective: --loss or --backbone")
    if loss is not None or backbone is not None:
        judge_obj = judge_from(session, judge)
        if loss is not None:
            checked = plugin(loss)
            return (lambda ref: PluginStyle(checked)), judge_obj, None, None, reference or "none"
        from ..critics.backbone import Backbone

        net = Backbone.from_folder(backbone, session.device)
        if reference is None:
            raise UserInputError("--backbone needs --reference IMAGE (the style image)")
        return (lambda ref: BackboneStyle(net, ref, content_weight)), judge_obj, None, None, reference
    _needs(session, "stylize", "--backbone PATH --reference IMAGE, or --loss FILE.py:FUNC")
    from ..embedded.digit_objectives import REFERENCES, DigitJudge, DigitStyle, digit_prompts

    critics = model_critics(session)
    judge_obj = judge_from(session, judge) if judge is not None else DigitJudge(critics)
    prompts = digit_prompts(session.comps.settings) if prompt is None and session.comps.settings.get("words") else None
    return (lambda ref: DigitStyle(critics, ref, content_weight)), judge_obj, prompts, REFERENCES, reference or "outline"


def plugin_target(loss: str | None):
    """``--loss SPEC`` as a target (None without one)."""
    return None if loss is None else PluginTarget(plugin(loss))


def finetune_rewards(session, options):
    """(reward sum, judge or None, reward specs, judge spec) of a finetune run (``options``: finetune's
    Options): ``--reward`` / ``--judge-reward`` SPECs, where the digits model's kinds ``digits-guide`` and
    ``digits-judge`` are known; without ``--reward`` on a model that ships the digits critics, its guide
    classifier, judged by its independent judge."""
    from ..critics.errors import CriticError
    from ..embedded.rewards import DIGIT_REWARDS
    from ..rewards import load_judge, load_rewards

    specs = list(options.reward or [])
    judge = options.judge_reward
    if not specs:
        _needs(session, "finetune", "--reward SPEC, e.g. --reward clip:FOLDER or --reward my_reward.py:score")
        folder = session.critics_path or session.model_path  # (None: the embedded model's critics)
        suffix = "" if folder is None else f":{folder}"
        specs = [f"digits-guide{suffix}"]
        judge = judge or f"digits-judge{suffix}"
    try:
        reward = load_rewards(specs, device=session.device, kinds=DIGIT_REWARDS)
        judge_obj = None if judge is None else load_judge(judge, device=session.device, kinds=DIGIT_REWARDS)
    except CriticError as e:
        raise UserInputError(str(e)) from None
    return reward, judge_obj, specs, judge
