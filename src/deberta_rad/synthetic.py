"""Seeded synthetic chest X-ray reports with ground-truth labels: the embedded default corpus.

`make demo` and the tests need a labelled corpus without anything outside the repo, so this module
writes realistic reports in two institution styles and the labels that are true by construction:

- ``narrative`` (st-elsewhere-general, a hospital): free-text EXAMINATION / INDICATION / COMPARISON /
  FINDINGS / IMPRESSION, MIMIC-style ``___`` placeholders, more hedging, more acute findings;
- ``templated`` (northfield-clinic, an outpatient clinic): terse organ-system lines, IU-style ``XXXX``
  placeholders, many findings stated explicitly absent, more nodules, fractures and pleural thickening.

The two styles differ in wording *and* in label distribution on purpose: monitoring uses them as two
institutions to test drift detection.

The phrasings are the generator's own templates, written from the way radiologists word chest
radiograph reports, and are kept independent of the rules teacher's vocabulary: the teacher is not
tuned on them, and they are not tuned to it. Its ground truth follows the conventions below, so scores
against it ("gold" in the demo's metrics) are synthetic: they show the lifecycle working, not the
labels' quality on real reports (for that, see the IU X-ray and radlabels benchmarks in the README).

Labelling conventions (CheXpert's, applied consistently):
- every hedge is ``uncertain``, including "likely", "probable", "suggestive of" and "X versus Y";
- "resolved" is ``absent``; "lungs are clear" and "no acute cardiopulmonary process" set no finding;
- the INDICATION/HISTORY line may ask about a finding ("r/o PTX") without labelling it, so a model
  learns that a clinical question is not a finding;
- support devices, degenerative changes and de-identification placeholders carry no label;
- ``No Finding`` follows `schema.apply_no_finding_rule`, and only reports without a present or
  uncertain finding are written to read normal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import NamedTuple

from deberta_rad.schema import FINDINGS, LabelRecord, Report, TeacherInfo, apply_no_finding_rule

TEACHER = TeacherInfo(name="synthetic-ground-truth", model="generator-v1")
STYLES: tuple[str, ...] = ("narrative", "templated")
FORMS: tuple[str, ...] = ("sentence", "terse")  # prose of narrative bodies; templated lines and impressions
LABELLED = tuple(f for f in FINDINGS if f != "No Finding")

# Statements a report can only make about an earlier study.
PRIOR_ONLY_WORDS = ("resolved", "unchanged", "interval", "again")

# Organ systems: the templated style's lines and the narrative style's sentence order.
SECTIONS: dict[str, tuple[str, ...]] = {
    "Lungs": ("Lung Opacity", "Consolidation", "Atelectasis", "Infiltrate", "Edema", "Lung Lesion"),
    "Pleura": ("Pleural Effusion", "Pneumothorax", "Pleural Thickening"),
    "Heart": ("Cardiomegaly",),
    "Mediastinum": ("Enlarged Cardiomediastinum",),
    "Bones": ("Fracture",),
}

# Stating a finding absent would contradict a positive statement about any finding listed with it.
ABSENT_CONFLICTS: dict[str, tuple[str, ...]] = {
    "Lung Opacity": ("Atelectasis", "Consolidation", "Edema", "Infiltrate", "Lung Lesion"),
    "Enlarged Cardiomediastinum": ("Cardiomegaly",),
    "Cardiomegaly": ("Enlarged Cardiomediastinum",),
}


@dataclass(frozen=True)
class StyleSpec:
    """How one institution writes and what it sees: status weights and per-finding prevalence."""

    institution: str
    normal_rate: float
    status_weights: dict[str, float]
    positive_mult: dict[str, float]
    absent_mult: dict[str, float]


_POSITIVE = {
    "Atelectasis": 1.6,
    "Cardiomegaly": 1.3,
    "Consolidation": 0.9,
    "Edema": 1.0,
    "Enlarged Cardiomediastinum": 0.5,
    "Fracture": 0.5,
    "Infiltrate": 0.4,
    "Lung Lesion": 0.6,
    "Lung Opacity": 1.5,
    "Pleural Effusion": 1.7,
    "Pleural Thickening": 0.4,
    "Pneumothorax": 0.5,
}
_ABSENT = {
    "Atelectasis": 0.5,
    "Cardiomegaly": 1.5,
    "Consolidation": 2.0,
    "Edema": 1.4,
    "Enlarged Cardiomediastinum": 1.2,
    "Fracture": 0.8,
    "Infiltrate": 0.4,
    "Lung Lesion": 0.5,
    "Lung Opacity": 0.8,
    "Pleural Effusion": 2.2,
    "Pleural Thickening": 0.3,
    "Pneumothorax": 2.4,
}


def _scaled(base: dict[str, float], factors: dict[str, float]) -> dict[str, float]:
    """Per-institution prevalence: the shared base rates with a few findings scaled."""
    return {f: rate * factors.get(f, 1.0) for f, rate in base.items()}


STYLE_SPECS: dict[str, StyleSpec] = {
    "narrative": StyleSpec(  # inpatient hospital: congestive failure, post-procedure pneumothorax, hedges
        institution="st-elsewhere-general",
        normal_rate=0.25,
        status_weights={"present": 0.18, "absent": 0.13, "uncertain": 0.11, "not_mentioned": 0.58},
        positive_mult=_scaled(_POSITIVE, {"Edema": 1.6, "Atelectasis": 1.3, "Pneumothorax": 1.6, "Lung Lesion": 0.6}),
        absent_mult=_ABSENT,
    ),
    "templated": StyleSpec(  # outpatient clinic: nodules, old fractures, pleural thickening, negatives
        institution="northfield-clinic",
        normal_rate=0.40,
        status_weights={"present": 0.14, "absent": 0.40, "uncertain": 0.045, "not_mentioned": 0.415},
        positive_mult=_scaled(
            _POSITIVE,
            {
                "Edema": 0.4,
                "Pneumothorax": 0.4,
                "Fracture": 2.0,
                "Lung Lesion": 2.2,
                "Pleural Thickening": 2.5,
                "Infiltrate": 2.0,
            },
        ),
        absent_mult=_scaled(_ABSENT, {"Fracture": 2.0, "Lung Lesion": 2.0, "Pleural Thickening": 2.0}),
    ),
}

# Noun forms of each finding, used by the generic negation and hedge templates ("No {t}.").
TERMS: dict[str, list[str]] = {
    "Atelectasis": ["atelectasis", "subsegmental atelectasis", "lobar collapse"],
    "Cardiomegaly": ["cardiomegaly", "cardiac enlargement"],
    "Consolidation": ["consolidation", "focal consolidation", "airspace consolidation"],
    "Edema": ["pulmonary edema", "interstitial edema", "edema"],
    "Enlarged Cardiomediastinum": ["mediastinal widening", "widening of the mediastinum"],
    "Fracture": ["acute fracture", "rib fracture", "displaced rib fracture"],
    "Infiltrate": ["infiltrate", "focal infiltrate", "pulmonary infiltrate"],
    "Lung Lesion": ["pulmonary nodule", "nodule", "lung mass", "suspicious pulmonary lesion", "metastatic disease"],
    "Lung Opacity": ["focal opacity", "airspace disease", "airspace opacity"],
    "Pleural Effusion": ["pleural effusion", "effusion", "pleural fluid"],
    "Pleural Thickening": ["pleural thickening", "pleural plaques"],
    "Pneumothorax": ["pneumothorax", "PTX", "apical pneumothorax"],
}

# Generic templates by status and form: "sentence" is narrative prose, "terse" the templated lines
# and every IMPRESSION.
GENERIC: dict[str, dict[str, list[str]]] = {
    "absent": {
        "sentence": [
            "No {t}.",
            "There is no {t}.",
            "No evidence of {t}.",
            "No {t} is seen.",
            "{t} is not seen.",
            "There is no radiographic evidence of {t}.",
        ],
        "terse": ["No {t}.", "Negative for {t}.", "No {t} seen.", "No {t} identified."],
    },
    "uncertain": {
        "sentence": [
            "{t} cannot be excluded.",
            "Cannot rule out {t}.",
            "Possible {t}.",
            "{t} is suspected.",
            "Likely {t}.",
            "{t} is not excluded.",
            "Probable {t}.",
        ],
        "terse": ["Possible {t}.", "Questionable {t}.", "? {t}.", "Cannot exclude {t}."],
    },
}

# Finding-specific variants: status -> finding -> (prose sentence, terse line) pairs. A report picks
# one variant per finding and uses its prose in a narrative body and its terse form in a templated
# body and in every IMPRESSION, so a restatement never moves a finding. None: that form has no such
# wording. Placeholders are the finding's modifiers ({side}, {size}, {sev}, {sevly}, {rib}, {mm}, {cm}).
Pair = tuple[str | None, str | None]
SPECIFIC: dict[str, dict[str, list[Pair]]] = {
    "present": {
        "Atelectasis": [
            ("There is {side} basilar atelectasis.", "{side} basilar atelectasis."),
            ("Mild subsegmental atelectasis at the {side} base.", "Subsegmental atelectasis, {side} base."),
            ("Volume loss in the {side} lower lobe with collapse.", "{side} lower lobe collapse."),
            ("Plate-like atelectasis in the {side} mid lung.", "Plate-like atelectasis, {side} mid lung."),
            ("Bibasilar atelectasis is present.", "Bibasilar atelectasis."),
        ],
        "Cardiomegaly": [
            ("Heart size is {sevly} enlarged.", "{sev} cardiomegaly."),
            ("The cardiac silhouette is enlarged.", "Enlarged heart."),
            ("There is {sev} cardiomegaly.", "{sev} cardiomegaly."),
            ("There is {sev} enlargement of the cardiac silhouette.", "{sev} enlargement of the cardiac silhouette."),
            ("The heart is large.", "Large heart."),
        ],
        "Consolidation": [
            ("There is consolidation in the {side} lower lobe.", "{side} lower lobe consolidation."),
            ("Dense {side} lower lobe consolidation.", "Dense {side} lower lobe consolidation."),
            ("Focal consolidation is present at the {side} base.", "Consolidation, {side} base."),
        ],
        "Edema": [
            ("There is {sev} pulmonary edema.", "{sev} pulmonary edema."),
            ("Pulmonary vascular congestion with interstitial edema.", "Vascular congestion and edema."),
            ("Findings are consistent with {sev} interstitial edema.", "{sev} interstitial edema."),
            (
                "Vascular congestion and interstitial edema consistent with CHF.",
                "CHF with interstitial edema.",
            ),
            ("Findings are consistent with congestive heart failure.", "Congestive heart failure."),
            ("Kerley B lines are present at both bases.", "Kerley B lines."),
        ],
        "Enlarged Cardiomediastinum": [
            ("The mediastinum is widened.", "Widened mediastinum."),
            ("The cardiomediastinal silhouette is enlarged.", "Enlarged cardiomediastinal silhouette."),
            ("There is widening of the superior mediastinum.", "Widened superior mediastinum."),
            ("There is mediastinal lymphadenopathy.", "Mediastinal adenopathy."),
            ("The mediastinal contours are widened.", "Mediastinal widening."),
        ],
        "Fracture": [
            ("There is an acute fracture of the {side} {rib} rib.", "Acute {side} {rib} rib fracture."),
            ("Healing fracture of the {side} clavicle.", "Healing {side} clavicle fracture."),
            (
                "Mild compression deformity of a lower thoracic vertebral body.",
                "Thoracic compression deformity.",
            ),
            ("Nondisplaced fractures of the {side} {rib} and adjacent ribs.", "{side} rib fractures."),
            ("The {side} {rib} rib is fractured.", "Fractured {side} {rib} rib."),
        ],
        "Infiltrate": [
            ("There is a {side} lower lobe infiltrate.", "{side} lower lobe infiltrate."),
            ("Patchy infiltrate in the {side} upper lobe.", "{side} upper lobe infiltrate."),
            ("Bilateral interstitial infiltrates are present.", "Bilateral interstitial infiltrates."),
        ],
        "Lung Lesion": [
            ("There is a {mm} mm nodule in the {side} upper lobe.", "{mm} mm {side} upper lobe nodule."),
            ("A {cm} cm mass is seen in the {side} upper lobe.", "{cm} cm {side} upper lobe mass."),
            ("Spiculated lesion at the {side} lung apex.", "Spiculated {side} apical lesion."),
            ("Multiple pulmonary nodules consistent with metastases.", "Pulmonary metastases."),
            ("Cavitary lesion in the {side} upper lobe.", "{side} upper lobe cavitary lesion."),
            ("Known {side} upper lobe carcinoma.", "{side} upper lobe carcinoma."),
        ],
        "Lung Opacity": [
            ("Patchy opacity at the {side} base.", "{side} basilar opacity."),
            ("There is {side} lower lobe airspace disease.", "Airspace disease, {side} lower lobe."),
            ("Hazy opacification of the {side} hemithorax.", "Hazy {side} hemithorax opacification."),
            ("Streaky opacity in the {side} mid lung.", "Streaky {side} mid lung opacity."),
            ("Patchy density at the {side} base.", "{side} basilar density."),
            ("There is mild haziness at the {side} base.", "Haziness, {side} base."),
            ("Ground-glass opacity in the {side} upper lobe.", "{side} upper lobe ground-glass opacity."),
        ],
        "Pleural Effusion": [
            ("There is a {size} {side} pleural effusion.", "{size} {side} pleural effusion."),
            ("{size} {side} pleural effusion is present.", "{size} {side} effusion."),
            (
                "Blunting of the {side} costophrenic angle consistent with a {size} effusion.",
                "{size} {side} effusion.",
            ),
            ("Small bilateral pleural effusions.", "Small bilateral effusions."),
            ("{side} pleural effusion is unchanged in size, {size}.", "Unchanged {size} {side} effusion."),
            ("There is a {size} amount of {side} pleural fluid.", "{size} {side} pleural fluid."),
            ("Layering fluid in the {side} pleural space.", "Layering {side} pleural fluid."),
        ],
        "Pleural Thickening": [
            ("There is {side} apical pleural thickening.", "{side} apical pleural thickening."),
            (
                "Mild pleural thickening along the {side} lateral chest wall.",
                "{side} lateral pleural thickening.",
            ),
            ("Chronic {side} pleural thickening is unchanged.", "Unchanged {side} pleural thickening."),
            ("Calcified pleural plaques along the {side} hemithorax.", "Calcified {side} pleural plaques."),
            ("There is {side} apical pleural capping.", "{side} apical pleural cap."),
            ("Thickening of the minor fissure.", "Minor fissure thickening."),
        ],
        "Pneumothorax": [
            ("There is a {size} {side} apical pneumothorax.", "{size} {side} apical PTX."),
            ("{side} pneumothorax measuring {mm} mm at the apex.", "{mm} mm {side} apical pneumothorax."),
            ("{size} {side} pneumothorax is again seen.", "{size} {side} pneumothorax, unchanged."),
            (
                "A {size} {side} apical pneumothorax is present, with a visible visceral pleural line.",
                "{size} {side} apical pneumothorax.",
            ),
        ],
    },
    "absent": {
        "Atelectasis": [("Previously seen {side} basilar atelectasis has resolved.", "Atelectasis has resolved.")],
        "Cardiomegaly": [
            ("Heart size is normal.", "Normal size."),
            ("The cardiac silhouette is within normal limits.", "Heart size normal."),
            ("The heart is not enlarged.", "Not enlarged."),
            ("Heart size is at the upper limits of normal.", "Upper limits of normal heart size."),
        ],
        "Consolidation": [
            ("The lungs are free of focal consolidation.", None),
            ("Previously seen {side} lower lobe consolidation has resolved.", "Consolidation has resolved."),
        ],
        "Edema": [
            ("No pulmonary vascular congestion or edema.", "No vascular congestion."),
            ("No evidence of CHF.", "No CHF."),
        ],
        "Enlarged Cardiomediastinum": [
            ("The cardiomediastinal silhouette is normal.", "Normal."),
            ("Mediastinal contours are within normal limits.", "Normal contours."),
            (None, "Not widened."),
        ],
        "Fracture": [("No acute displaced rib fracture is identified.", "No acute fracture.")],
        "Lung Opacity": [("Previously seen {side} basilar opacity has resolved.", None)],
        "Pleural Effusion": [
            ("The costophrenic angles are sharp.", "Costophrenic angles sharp."),
            ("Previously seen {side} effusion has resolved.", "Effusion resolved."),
        ],
        "Pneumothorax": [
            ("Previously seen {side} pneumothorax has resolved.", "PTX resolved."),
            (None, "No PTX."),
        ],
    },
    "uncertain": {
        "Atelectasis": [
            ("Likely subsegmental atelectasis at the {side} base.", "Possible {side} basilar atelectasis."),
            (
                "Possible plate-like atelectasis in the {side} mid lung.",
                "Possible {side} mid lung atelectasis.",
            ),
        ],
        "Cardiomegaly": [
            ("Heart size is borderline enlarged.", "Borderline cardiomegaly."),
            ("The heart may be mildly enlarged, accentuated by AP technique.", "Possible mild cardiomegaly."),
        ],
        "Consolidation": [
            (
                "Early consolidation in the {side} lower lobe cannot be excluded.",
                "Possible {side} lower lobe consolidation.",
            ),
            (
                "Findings at the {side} base may represent early consolidation.",
                "Possible early {side} basilar consolidation.",
            ),
        ],
        "Edema": [
            ("Mild interstitial edema is a consideration.", "Possible mild interstitial edema."),
            ("There may be mild interstitial edema.", "Possible mild edema."),
            ("Findings are suggestive of mild interstitial edema.", "Suspected mild interstitial edema."),
        ],
        "Enlarged Cardiomediastinum": [
            (
                "The mediastinum may be widened, possibly due to AP technique.",
                "Possibly widened mediastinum.",
            ),
            (None, "Questionable mediastinal widening."),
        ],
        "Fracture": [
            (
                "Possible nondisplaced fracture of the {side} {rib} rib.",
                "Possible {side} {rib} rib fracture.",
            ),
            ("Questionable {side} clavicle fracture.", "Questionable {side} clavicle fracture."),
        ],
        "Infiltrate": [
            ("Possible {side} basilar infiltrate.", "Questionable {side} basilar infiltrate."),
            (
                "Findings in the {side} lower lobe may represent an early infiltrate.",
                "Possible early {side} lower lobe infiltrate.",
            ),
        ],
        "Lung Lesion": [
            (
                "A possible {mm} mm nodule projects over the {side} mid lung, nipple shadow versus nodule.",
                "Possible {mm} mm {side} mid lung nodule.",
            ),
        ],
        "Lung Opacity": [
            (
                "Questionable subtle opacity in the {side} mid lung.",
                "Possible subtle {side} mid lung opacity.",
            )
        ],
        "Pleural Effusion": [
            (
                "Blunting of the {side} costophrenic angle, likely a trace effusion.",
                "Possible trace {side} effusion.",
            ),
            ("A small {side} pleural effusion cannot be excluded.", "Possible small {side} effusion."),
        ],
        "Pleural Thickening": [
            ("Possible {side} apical pleural thickening.", "Possible {side} apical pleural thickening."),
            (None, "Questionable pleural thickening, {side} base."),
        ],
        "Pneumothorax": [
            (
                "Lucency at the {side} apex, skin fold versus small pneumothorax.",
                "Possible small {side} pneumothorax.",
            ),
            ("Possible tiny {side} apical pneumothorax.", "Possible tiny {side} apical PTX."),
        ],
    },
}

# Narrative sentences stating two findings at once: (findings, their statuses, prose/terse pairs).
COMPOSITES: list[tuple[tuple[str, str], tuple[str, str], list[Pair]]] = [
    (
        ("Lung Opacity", "Atelectasis"),
        ("present", "uncertain"),
        [
            (
                "Patchy opacity at the {side} base may represent atelectasis.",
                "{side} basilar opacity, possibly atelectasis.",
            ),
            ("{side} basilar opacity, likely atelectasis.", "{side} basilar opacity, likely atelectasis."),
        ],
    ),
    (
        ("Lung Opacity", "Consolidation"),
        ("present", "uncertain"),
        [
            (
                "Opacity in the {side} lower lobe is suggestive of early consolidation.",
                "{side} lower lobe opacity, possibly early consolidation.",
            ),
            (
                "{side} basilar opacity; consolidation cannot be excluded.",
                "{side} basilar opacity, ? consolidation.",
            ),
        ],
    ),
    (
        ("Lung Opacity", "Consolidation"),
        ("present", "present"),
        [("Consolidative opacity in the {side} lower lobe.", "{side} lower lobe consolidative opacity.")],
    ),
    (
        ("Lung Opacity", "Infiltrate"),
        ("present", "uncertain"),
        [
            (
                "Hazy opacity in the {side} mid lung could reflect an infiltrate.",
                "{side} mid lung opacity, possibly infiltrate.",
            )
        ],
    ),
    (
        ("Atelectasis", "Consolidation"),
        ("uncertain", "uncertain"),
        [
            (
                "{side} lower lobe atelectasis versus consolidation.",
                "{side} lower lobe atelectasis versus consolidation.",
            )
        ],
    ),
    (
        ("Pleural Effusion", "Pleural Thickening"),
        ("uncertain", "uncertain"),
        [
            (
                "Blunting of the {side} costophrenic angle, small effusion versus pleural thickening.",
                "{side} effusion versus pleural thickening.",
            )
        ],
    ),
    (
        ("Cardiomegaly", "Enlarged Cardiomediastinum"),
        ("absent", "absent"),
        [
            ("Heart size and mediastinal contours are normal.", None),
            ("The heart and mediastinum are within normal limits.", None),
            ("Heart size, mediastinal contours, and pulmonary vasculature are within normal limits.", None),
            ("The cardiomediastinal silhouette is normal in size and contour.", None),
        ],
    ),
    (
        ("Cardiomegaly", "Edema"),
        ("present", "present"),
        [
            (
                "Cardiomegaly with vascular congestion and {sev} interstitial edema, consistent with CHF.",
                "Cardiomegaly and {sev} interstitial edema, consistent with CHF.",
            )
        ],
    ),
]

COMBINED_NEGATIONS = {
    "sentence": ["No {list}.", "There is no {list}.", "No evidence of {list}.", "No {list} is seen."],
    "terse": ["No {list}.", "Negative for {list}."],
}

NEUTRAL = {  # label-free sentences: devices, old surgery, degenerative change, technique
    "sentence": [
        "Endotracheal tube terminates ___ cm above the carina.",
        "Nasogastric tube courses below the diaphragm and out of view.",
        "Right internal jugular central venous catheter terminates in the mid SVC.",
        "Left-sided pacemaker with leads in the right atrium and right ventricle.",
        "Median sternotomy wires are intact.",
        "Degenerative changes of the thoracic spine.",
        "Surgical clips project over the right upper quadrant.",
        "Atherosclerotic calcification of the aortic knob.",
        "The patient is slightly rotated.",
    ],
    "terse": [
        "Right PICC, tip in the SVC.",
        "Pacemaker in place.",
        "Sternotomy wires.",
        "Cholecystectomy clips.",
        "Aortic calcification.",
    ],
}
BONE_NOTES = ["Mild degenerative changes.", "Degenerative changes of the spine.", "Mild thoracic kyphosis."]
LUNGS_CLEAR = {
    "sentence": ["The lungs are clear.", "The lungs are well expanded and clear."],
    "terse": ["Clear."],
}
NORMAL_IMPRESSIONS = {
    "narrative": [
        "No acute cardiopulmonary process.",
        "No acute intrathoracic abnormality.",
        "Normal chest radiograph.",
    ],
    "templated": ["No acute disease.", "Negative chest.", "No acute cardiopulmonary abnormality."],
}
COMPLAINTS = [
    "cough",
    "fever and cough",
    "shortness of breath",
    "chest pain",
    "a fall",
    "hypoxia",
    "preoperative evaluation",
    "line placement",
    "weakness",
    "follow-up",
]
# Clinical questions; those naming a finding are deliberately independent of the labels.
QUESTIONS = [
    "Evaluate for pneumonia.",
    "r/o PTX.",
    "Eval for effusion.",
    "?CHF.",
    "Assess for rib fracture.",
    "Rule out pneumothorax.",
    "Question of mass on outside CT.",
    "Evaluate for interval change.",
    "Concern for aspiration.",
    "",
]
EXAMS = {"templated": ["XR CHEST 2V", "CXR PA/LAT"]}
# Narrative examination headers and the technique sentences that fit each ("" opens with a finding).
NARRATIVE_EXAMS = {
    "CHEST (PA AND LAT)": [
        "PA and lateral views of the chest were obtained.",
        "Frontal and lateral radiographs of the chest.",
        "",
    ],
    "CHEST (PORTABLE AP)": [
        "Single portable AP view of the chest.",
        "Portable semi-upright AP radiograph.",
        "",
    ],
}


class _Patient(NamedTuple):
    """Who is imaged: a patient's studies share an institution (style) and sex across visits."""

    patient_id: str
    style: str
    sex: str


@dataclass(frozen=True)
class _Variant:
    """How a report words one finding: a specific pair (None: the generic templates) and a noun form."""

    pair: Pair | None
    term: str
    covers: tuple[str, ...]


@dataclass
class _Study:
    """One report being written: its labels, per-finding wording and modifiers, evidence sentences."""

    rng: random.Random
    patient: _Patient
    statuses: dict[str, str]
    has_prior: bool
    mods: dict[str, dict[str, str]] = field(default_factory=dict)
    variants: dict[str, _Variant] = field(default_factory=dict)
    evidence: dict[str, list[str]] = field(default_factory=dict)

    def say(self, text: str, findings: Sequence[str]) -> str:
        """Record `text` as evidence of `findings` and return it."""
        for finding in findings:
            sentences = self.evidence.setdefault(finding, [])
            if text not in sentences:
                sentences.append(text)
        return text

    def mentioned(self, findings: Sequence[str], *statuses: str) -> list[str]:
        """The given findings whose status is one of `statuses`, in the given order."""
        return [f for f in findings if self.statuses[f] in statuses]


def _capitalize(text: str) -> str:
    """Upper-case only the first letter, so 'PTX' and placeholders survive."""
    return text[:1].upper() + text[1:]


def _draw_mods(rng: random.Random) -> dict[str, str]:
    """Side, size and severity for one finding, kept fixed so FINDINGS and IMPRESSION agree."""
    sev = rng.choice(["mild", "moderate", "severe"])
    return {
        "side": rng.choice(["left", "right"]),
        "size": rng.choice(["small", "small", "moderate", "large"]),
        "sev": sev,
        "sevly": f"{sev}ly",
        "rib": rng.choice(["4th", "5th", "6th", "7th", "8th", "9th"]),
        "mm": str(rng.randint(4, 18)),
        "cm": str(rng.randint(2, 6)),
    }


def _draw_statuses(rng: random.Random, spec: StyleSpec) -> dict[str, str]:
    """Independent per-finding draws; a normal study states findings only as absent."""
    normal = rng.random() < spec.normal_rate
    w = spec.status_weights
    statuses = {}
    for finding in LABELLED:
        pos, neg = spec.positive_mult[finding], spec.absent_mult[finding]
        weights = [
            0.0 if normal else w["present"] * pos,
            w["absent"] * neg,
            0.0 if normal else w["uncertain"] * pos,
            w["not_mentioned"],
        ]
        statuses[finding] = rng.choices(("present", "absent", "uncertain", "not_mentioned"), weights)[0]
    for finding, others in ABSENT_CONFLICTS.items():
        if statuses[finding] == "absent" and any(statuses[o] in ("present", "uncertain") for o in others):
            statuses[finding] = "not_mentioned"
    return statuses


def _pick_variant(study: _Study, finding: str, form: str) -> _Variant:
    """Choose a finding's wording once, among specific pairs that have `form` and the generic ones."""
    status = study.statuses[finding]
    pairs = [p for p in SPECIFIC[status].get(finding, []) if p[FORMS.index(form)]]
    if not study.has_prior:
        pairs = [p for p in pairs if not any(word in str(p) for word in PRIOR_ONLY_WORDS)]
    generic = GENERIC.get(status, {}).get(form, [])
    pair = study.rng.choice(pairs + [None] * len(generic))
    return _Variant(pair, study.rng.choice(TERMS[finding]), (finding,))


def _phrase(study: _Study, finding: str, form: str) -> str:
    """State `finding` with its status in `form` ("sentence" or "terse"), worded as before."""
    if finding not in study.variants:
        study.variants[finding] = _pick_variant(study, finding, form)
    variant = study.variants[finding]
    template = variant.pair[FORMS.index(form)] if variant.pair else None
    if template is None:
        template = study.rng.choice(GENERIC[study.statuses[finding]][form])
    text = template.format(t=variant.term, **study.mods[finding])
    return study.say(_capitalize(text), variant.covers)


def _combined_negation(study: _Study, findings: list[str], form: str) -> str:
    """'No focal consolidation, pleural effusion, or pneumothorax.' for several absent findings."""
    terms = [study.rng.choice(TERMS[f]) for f in findings]
    listed = f"{terms[0]} or {terms[1]}" if len(terms) == 2 else f"{', '.join(terms[:-1])}, or {terms[-1]}"
    template = study.rng.choice(COMBINED_NEGATIONS[form])
    return study.say(_capitalize(template.format(list=listed)), findings)


def _negations(study: _Study, findings: list[str], form: str, group_p: float) -> list[str]:
    """State absent findings, merging two or three of them into one sentence with probability `group_p`."""
    findings = findings[:]
    study.rng.shuffle(findings)
    sentences = []
    while findings:
        size = min(len(findings), study.rng.choice([2, 3]))
        if size > 1 and study.rng.random() < group_p:
            sentences.append(_combined_negation(study, findings[:size], form))
            findings = findings[size:]
        else:
            sentences.append(_phrase(study, findings.pop(0), form))
    return sentences


def _composites(study: _Study) -> tuple[list[str], set[str]]:
    """Two-finding sentences ('opacity may represent atelectasis') where the drawn statuses fit."""
    sentences, used = [], set()
    for findings, statuses, pairs in COMPOSITES:
        fits = all(study.statuses[f] == s and f not in used for f, s in zip(findings, statuses, strict=True))
        if fits and study.rng.random() < 0.7:
            variant = _Variant(study.rng.choice(pairs), "", findings)
            for finding in findings:
                study.mods[finding], study.variants[finding] = study.mods[findings[0]], variant
            sentences.append(_phrase(study, findings[0], "sentence"))
            used.update(findings)
    return sentences, used


def _section(study: _Study, name: str, form: str, skip: set[str]) -> list[str]:
    """Statements of one organ system: positives first, then negations; lungs may read 'clear'."""
    findings = [f for f in SECTIONS[name] if f not in skip]
    positives = study.mentioned(findings, "present", "uncertain")
    sentences = [_phrase(study, f, form) for f in positives]
    lungs_clear = name == "Lungs" and not study.mentioned(SECTIONS["Lungs"], "present", "uncertain")
    if lungs_clear and study.rng.random() < 0.6:
        sentences.append(study.rng.choice(LUNGS_CLEAR[form]))
    group_p = 0.6 if form == "sentence" else 0.4
    return sentences + _negations(study, study.mentioned(findings, "absent"), form, group_p)


def _impression(study: _Study) -> str:
    """The IMPRESSION line: positives restated tersely with the same status and modifiers, or normal."""
    positives = study.mentioned(LABELLED, "present", "uncertain")
    if not positives:
        return f"IMPRESSION: {study.rng.choice(NORMAL_IMPRESSIONS[study.patient.style])}"
    study.rng.shuffle(positives)
    lines = list(dict.fromkeys(_phrase(study, f, "terse") for f in positives[:3]))
    if study.statuses["Pneumothorax"] == "absent" and study.rng.random() < 0.3:
        lines.append(_phrase(study, "Pneumothorax", "terse"))
    if study.patient.style == "templated" or (len(lines) > 1 and study.rng.random() < 0.5):
        return "IMPRESSION:\n" + "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
    return f"IMPRESSION: {' '.join(lines)}"


def _narrative(study: _Study) -> str:
    """Free-text hospital report; heart-first or lungs-first order, prose hedges, '___' placeholders."""
    rng = study.rng
    composite, used = _composites(study)
    order = list(SECTIONS) if rng.random() < 0.5 else ["Heart", "Mediastinum", "Lungs", "Pleura", "Bones"]
    exam = rng.choice(list(NARRATIVE_EXAMS))
    body = [rng.choice(NARRATIVE_EXAMS[exam]), *composite]
    body += [s for name in order for s in _section(study, name, "sentence", used)]
    body += rng.sample(NEUTRAL["sentence"], rng.choice([0, 0, 1, 2]))
    indication = f"___-year-old {study.patient.sex} with {rng.choice(COMPLAINTS)}. {rng.choice(QUESTIONS)}"
    comparison = "Chest radiograph from ___." if study.has_prior else rng.choice(["None.", "___."])
    return (
        f"EXAMINATION: {exam}\n"
        f"INDICATION: {indication.strip()}\n"
        f"COMPARISON: {comparison}\n"
        f"FINDINGS: {' '.join(s for s in body if s) or LUNGS_CLEAR['sentence'][0]}\n"
        f"{_impression(study)}"
    )


def _templated(study: _Study) -> str:
    """Terse clinic template: one line per organ system, explicit negatives, 'XXXX' placeholders."""
    rng = study.rng
    lines = []
    for name in SECTIONS:
        sentences = _section(study, name, "terse", set())
        if name == "Bones" and rng.random() < 0.3:
            sentences.append(rng.choice(BONE_NOTES))
        if sentences:
            lines.append(f"{name}: {' '.join(sentences)}")
    if rng.random() < 0.2:
        lines.append(f"Other: {rng.choice(NEUTRAL['terse'])}")
    lines = lines or [f"Lungs: {LUNGS_CLEAR['terse'][0]}"]  # nothing mentioned: the lungs still get a line
    history = f"{rng.choice(COMPLAINTS).capitalize()}. {rng.choice(QUESTIONS)}".strip()
    comparison = "XXXX" if study.has_prior else "None"
    return (
        f"EXAM: {rng.choice(EXAMS['templated'])}\nHISTORY: {history}\nCOMPARISON: {comparison}\n"
        f"FINDINGS:\n" + "\n".join(lines) + f"\n{_impression(study)}"
    )


RENDERERS = {"narrative": _narrative, "templated": _templated}


def _make_study(
    rng: random.Random, patient: _Patient, index: int, day: date, has_prior: bool
) -> tuple[Report, LabelRecord]:
    """Draw the labels first, then write text that states exactly those labels."""
    spec = STYLE_SPECS[patient.style]
    statuses = _draw_statuses(rng, spec)
    study = _Study(rng, patient, statuses, has_prior, mods={f: _draw_mods(rng) for f in LABELLED})
    text = RENDERERS[patient.style](study)
    report_id = f"synth-{patient.style}-{index:06d}"
    report = Report(
        report_id=report_id,
        text=text,
        institution=spec.institution,
        patient_id=patient.patient_id,
        study_date=day.isoformat(),
    )
    labels = LabelRecord(
        report_id=report_id, labels=apply_no_finding_rule(statuses), teacher=TEACHER, evidence=study.evidence
    )
    return report, labels


def generate_corpus(n_reports: int, seed: int, styles: Sequence[str] = STYLES) -> list[tuple[Report, LabelRecord]]:
    """`n_reports` reports with ground truth, identical for the same seed and styles.

    Patients have one to three studies at one institution (so a split must group by patient); later
    studies compare with the earlier one and may call a finding resolved.
    """
    unknown = [s for s in styles if s not in STYLE_SPECS]
    if unknown or not styles:
        raise ValueError(f"unknown or no styles {unknown}; choose from {', '.join(STYLES)}")
    rng = random.Random(seed)
    corpus: list[tuple[Report, LabelRecord]] = []
    while len(corpus) < n_reports:
        patient = _Patient(f"synth-pt-{len(corpus):06d}", rng.choice(list(styles)), rng.choice(["man", "woman"]))
        day = date(2015, 1, 1) + timedelta(days=rng.randrange(8 * 365))
        for visit in range(rng.choice([1, 1, 2, 3])):
            if len(corpus) == n_reports:
                break
            corpus.append(_make_study(rng, patient, len(corpus), day, visit > 0))
            day += timedelta(days=rng.randint(1, 400))
    return corpus


def write_corpus(out_dir: Path, n_reports: int, seed: int, styles: Sequence[str] = STYLES) -> tuple[Path, Path]:
    """Write `reports.jsonl` and `labels.jsonl` (one record per line, same order) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reports_path, labels_path = out_dir / "reports.jsonl", out_dir / "labels.jsonl"
    corpus = generate_corpus(n_reports, seed, styles)
    with (
        reports_path.open("w", encoding="utf-8", newline="\n") as reports_file,
        labels_path.open("w", encoding="utf-8", newline="\n") as labels_file,
    ):
        for report, labels in corpus:
            reports_file.write(report.model_dump_json(exclude_none=True) + "\n")
            labels_file.write(labels.model_dump_json(exclude_none=True) + "\n")
    return reports_path, labels_path
