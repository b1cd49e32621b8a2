"""The applications' objectives over critics from local folders or a plug-in loss: implementations of the
protocols of :mod:`.objectives` (target, judge, attack, style, loss). The digits model's implementations of the
same protocols are in :mod:`adjointdpm.embedded.digit_objectives`; the applications call either without
knowing which.

* classifier target: CE(logits, target) (the target by index or label name);
* CLIP target: 1 − cos(e_image, e_text) toward ``--clip-prompt``; reported as clip_score = 100 · cos;
* plug-in target: the user's loss (see :mod:`adjointdpm.critics.plugin`);
* classifier attack: −CE(logits, y) with y the classifier's label of the original image; success when the
  label changes (and a judge, if given, keeps its own label);
* safety attack: Σ relu(score + margin) of the pipeline's safety checker; success when it no longer flags.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ClassifierTarget:
    """guide: cross-entropy of a classifier folder's logits to one class (by index or label name)."""

    default_views = 8
    default_stop_loss = 0.1

    def __init__(self, classifier, target):
        self.classifier = classifier
        self.index = classifier.class_index(target)

    def describe(self) -> dict:
        return {"critic": f"classifier {self.classifier.path}", "target_index": self.index,
                "target_label": self.classifier.label(self.index)}

    def loss(self, images, *, prompts, indices):
        logits = self.classifier(images)
        return F.cross_entropy(logits, torch.full((logits.shape[0],), self.index, device=logits.device), reduction="none")

    @torch.no_grad()
    def hits(self, images):
        return self.classifier(images).argmax(-1) == self.index

    @torch.no_grad()
    def metrics(self, images) -> dict:
        logits = self.classifier(images)
        target = torch.full((images.shape[0],), self.index, device=logits.device)
        return {"critic_accuracy": float((logits.argmax(-1) == self.index).float().mean()),
                "critic_loss": float(F.cross_entropy(logits, target))}


class ClipTarget:
    """guide: 1 − cos(e_image, e_text) toward a text under a CLIP folder; reported as clip_score = 100 · cos."""

    default_views = 8
    default_stop_loss = 0.0

    def __init__(self, clip, text: str):
        self.clip, self.text = clip, text
        self.text_embed = clip.text_embeds([text])

    def describe(self) -> dict:
        return {"critic": f"clip {self.clip.path}", "clip_prompt": self.text}

    def loss(self, images, *, prompts, indices):
        return 1 - self.clip.cosine(images, self.text_embed)

    def hits(self, images):
        return None

    @torch.no_grad()
    def metrics(self, images) -> dict:
        return {"clip_score": 100 * float(self.clip.cosine(images, self.text_embed).mean())}


class PluginTarget:
    """guide (and invert with ``--loss``): the user's loss (see :mod:`.plugin`)."""

    default_views = 0
    default_stop_loss = 0.0

    def __init__(self, loss):
        self.plugin = loss

    def describe(self) -> dict:
        return {"critic": f"--loss {self.plugin.name}"}

    def loss(self, images, *, prompts, indices):
        return self.plugin(images, prompts=prompts, indices=indices)

    def hits(self, images):
        return None

    @torch.no_grad()
    def metrics(self, images, prompts=None, indices=None) -> dict:
        n = images.shape[0]
        prompts = prompts if prompts is not None else [""] * n
        indices = indices if indices is not None else list(range(n))
        return {"plugin_loss": float(self.plugin(images, prompts=prompts, indices=indices).mean())}


# ------------------------------------------------------------------------------------- judges
class ClassifierJudge:
    """A classifier folder as the judge: its label histogram, and its accuracy for one class."""

    def __init__(self, classifier, target=None):
        """``target``: the class (index or label name) whose accuracy is reported, or None."""
        self.classifier = classifier
        self.index = None if target is None else classifier.class_index(target)

    def describe(self) -> dict:
        return {"judge": f"classifier {self.classifier.path}",
                **({} if self.index is None else {"judge_target": self.classifier.label(self.index)})}

    @torch.no_grad()
    def labels(self, images):
        return self.classifier(images).argmax(-1)

    @torch.no_grad()
    def metrics(self, images, *, prompts=None, labels=None) -> dict:
        judge = self.labels(images)
        counts = torch.bincount(judge, minlength=self.classifier.num_classes)
        top = counts.argsort(descending=True)[:5]
        out = {"judge_top_labels": {self.classifier.label(int(i)): int(counts[i]) for i in top if counts[i] > 0}}
        if self.index is not None:
            out["judge_accuracy"] = float((judge == self.index).float().mean())
        if labels is not None:
            out["judge_accuracy"] = float((judge == labels).float().mean())
        return out


class ClipJudge:
    """A CLIP folder as the judge: the CLIP score of the images to a text (or to each image's prompt)."""

    def __init__(self, clip, text: str | None = None):
        self.clip, self.text = clip, text

    def describe(self) -> dict:
        return {"judge": f"clip {self.clip.path}", **({} if self.text is None else {"judge_prompt": self.text})}

    labels = None

    @torch.no_grad()
    def metrics(self, images, *, prompts=None, labels=None) -> dict:
        texts = [self.text] * images.shape[0] if self.text is not None else list(prompts or [""] * images.shape[0])
        emb = self.clip.text_embeds(texts)
        return {"judge_clip_score": 100 * float(self.clip.cosine(images, emb).mean())}


def target_label_for_judge(judge_classifier, classifier, index: int):
    """The judge's class for the optimised classifier's target: the same label name if the judge has it,
    else the same index."""
    name = classifier.label(index).lower()
    for k, v in judge_classifier.id2label.items():
        if v.lower() == name:
            return k
    return index


# ------------------------------------------------------------------------------------- attacks
class ClassifierAttack:
    """Flip a classifier's label of the original image inside the ℓ∞ ball; a judge, if given, must keep its own.

    Labels are (B, 2): the classifier's label of the original image and the judge's (the classifier's
    again without a judge)."""

    name = "classifier"
    none_valid = "to attack"

    def __init__(self, classifier, judge=None):
        self.classifier, self.judge = classifier, judge

    def prompts(self, settings: dict, n: int, prompt=None) -> list[str]:
        return [prompt or ""] * n

    @torch.no_grad()
    def setup(self, images):
        label = self.classifier(images).argmax(-1)
        judge = label if self.judge is None else self.judge.labels(images)
        return torch.stack([label, judge], 1), torch.ones_like(label, dtype=torch.bool)

    def loss(self, images, label):
        return -F.cross_entropy(self.classifier(images), label[:, 0], reduction="none")

    @torch.no_grad()
    def _judge_keeps(self, images, label):
        if self.judge is None:
            return torch.ones(images.shape[0], dtype=torch.bool, device=images.device)
        return self.judge.labels(images) == label[:, 1]

    @torch.no_grad()
    def success(self, images, label):
        return (self.classifier(images).argmax(-1) != label[:, 0]) & self._judge_keeps(images, label)

    @torch.no_grad()
    def metrics(self, images, label, valid) -> dict:
        out = {"critic_keeps_label": float((self.classifier(images).argmax(-1) == label[:, 0])[valid].float().mean())}
        if self.judge is not None:
            out["judge_keeps_label"] = float(self._judge_keeps(images, label)[valid].float().mean())
        return out


class SafetyAttack(ClassifierAttack):
    """Make the pipeline's own safety checker pass images it flags (labels as for :class:`ClassifierAttack`,
    column 0 unused)."""

    name = "safety"
    none_valid = "that the safety checker flags"

    def __init__(self, checker, margin: float, judge=None):
        self.checker, self.margin, self.judge = checker, margin, judge

    @torch.no_grad()
    def setup(self, images):
        flagged = self.checker.flag(images)
        zeros = torch.zeros_like(flagged, dtype=torch.long)
        judge = zeros if self.judge is None else self.judge.labels(images)
        return torch.stack([zeros, judge], 1), flagged

    def loss(self, images, label):
        return self.checker.attack_loss(images, self.margin)

    @torch.no_grad()
    def success(self, images, label):
        return (~self.checker.flag(images)) & self._judge_keeps(images, label)

    @torch.no_grad()
    def metrics(self, images, label, valid) -> dict:
        out = {"flag_rate": float(self.checker.flag(images)[valid].float().mean())}
        if self.judge is not None:
            out["judge_keeps_label"] = float(self._judge_keeps(images, label)[valid].float().mean())
        return out


# ------------------------------------------------------------------------------------- stylize
class StyleObjective:
    """stylize: a Gram style loss + λ · relative distance of the image's content features to the untuned
    image's. Subclasses set ``style`` and ``content_weight`` and say what the content features are."""


    def content(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def calibrate(self, train_images):
        self.style.calibrate(train_images)
        self.train_content = self.content(train_images)

    def loss(self, images, *, prompts, indices):
        phi = self.content(images)
        ref = self.train_content[torch.as_tensor(indices, device=phi.device)]
        content = (phi - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-8)
        return self.style(images) + self.content_weight * content

    @torch.no_grad()
    def metrics(self, images) -> dict:
        return {"style_loss": float(self.style(images).mean())}


class BackboneStyle(StyleObjective):
    """stylize: Gram style loss on a vision backbone; content = its last hidden state."""

    def __init__(self, backbone, reference: torch.Tensor, content_weight: float):
        from .backbone import GramStyle

        self.backbone, self.content_weight = backbone, content_weight
        self.style = GramStyle(backbone, reference)

    def describe(self) -> dict:
        return {"critic": f"backbone {self.backbone.path} (Gram matrices)"}

    def content(self, images):
        return self.backbone.content(images)


class PluginStyle(PluginTarget):
    """stylize / invert with ``--loss``: the user's loss is the whole objective."""

    def calibrate(self, train_images):
        pass
