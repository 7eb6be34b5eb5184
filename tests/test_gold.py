"""Gold-standard readers: formats, error cases and the IU X-ray MeSH mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import IU_DEV, RADLABELS, needs_shared

from deberta_rad.data import InputError, iu_report_text
from deberta_rad.gold import (
    GoldSet,
    iu_half,
    iu_mesh_findings,
    iu_presence_gold,
    match_finding_name,
    read_chexgpt_jsonl,
    read_chexpert_csv,
    read_gold,
    read_label_jsonl,
    read_radlabels_jsonl,
)
from deberta_rad.schema import FINDINGS


def write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def all_findings(status: str = "not_mentioned", **overrides: str) -> dict[str, str]:
    labels = {f: status for f in FINDINGS}
    labels.update({k.replace("_", " "): v for k, v in overrides.items()})
    return labels


# ---------------------------------------------------------------------------------------------
# Label JSONL
# ---------------------------------------------------------------------------------------------


def test_read_label_jsonl(tmp_path: Path) -> None:
    labels = all_findings(Pneumothorax="present")
    path = write_jsonl(tmp_path / "gold.jsonl", [{"report_id": "r1", "labels": labels}])
    assert read_label_jsonl(path) == {"r1": labels}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"report_id": "r1", "labels": {"Pneumothorax": "present"}}), "labels"),
        (json.dumps({"report_id": "r1", "labels": all_findings(Edema="maybe")}), "labels"),
    ],
)
def test_read_label_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"report_id": "r0", "labels": all_findings()})
    path = tmp_path / "gold.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        read_label_jsonl(path)
    assert f"{path}:2" in str(err.value)


# ---------------------------------------------------------------------------------------------
# CheXpert CSV
# ---------------------------------------------------------------------------------------------

CHEXPERT_HEADER = (
    "Report Impression,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Lesion,Lung Opacity,Edema,"
    "Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices"
)


def test_read_chexpert_csv_maps_values_and_numbers_rows(tmp_path: Path) -> None:
    path = tmp_path / "chexbert.csv"
    path.write_text(
        CHEXPERT_HEADER + '\n"small effusion, no ptx",,,,,,,,,,0.0,1.0,,,\n"maybe edema",,,-1.0,,,1,,,,,,,,1.0\n',
        encoding="utf-8",
    )
    gold = read_chexpert_csv(path)
    assert list(gold) == ["row-1", "row-2"]
    assert gold["row-1"]["Pneumothorax"] == "absent"
    assert gold["row-1"]["Pleural Effusion"] == "present"
    assert gold["row-2"]["Cardiomegaly"] == "uncertain"
    assert gold["row-2"]["Edema"] == "present"
    # CheXpert has no Infiltrate or Pleural Thickening column: those are not mentioned.
    assert gold["row-2"]["Infiltrate"] == gold["row-2"]["Pleural Thickening"] == "not_mentioned"
    assert list(gold["row-1"]) == list(FINDINGS)


def test_read_chexpert_csv_takes_the_id_column(tmp_path: Path) -> None:
    path = tmp_path / "gold.csv"
    path.write_text("study_id,Edema,Atelectasis\ns1,1.0,\ns2,,0.0\n", encoding="utf-8")
    gold = read_chexpert_csv(path)
    assert gold["s1"]["Edema"] == "present"
    assert gold["s2"]["Atelectasis"] == "absent"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("report_id,Foo\nr1,1.0\n", "none of the 13 findings"),
        ("report_id,Edema\nr1,2.0\n", "expected 1.0, 0.0, -1.0 or blank"),
        ("report_id,Edema\nr1,1.0\nr1,0.0\n", "appears twice"),
        ("report_id,Edema\nr1,1.0,extra\n", "more fields"),
    ],
)
def test_read_chexpert_csv_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "gold.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        read_chexpert_csv(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------
# CheX-GPT JSONL
# ---------------------------------------------------------------------------------------------


def test_read_chexgpt_jsonl_accepts_numbers_strings_and_name_variants(tmp_path: Path) -> None:
    label = {
        "Atelectasis": 1,
        "cardiomegaly": 0,
        "Edema": -1,
        "Enlarged Cardiom.": "1.0",
        "pleural_effusion": "-1.0",
        "Pneumothorax": None,
        "Fracture": "present",
        "Support Devices": 1,
    }
    path = write_jsonl(tmp_path / "mimic500.jsonl", [{"study_id": 501, "text": "…", "label": label}])
    gold = read_chexgpt_jsonl(path)["501"]
    assert gold["Atelectasis"] == "present"
    assert gold["Cardiomegaly"] == "absent"
    assert gold["Edema"] == "uncertain"
    assert gold["Enlarged Cardiomediastinum"] == "present"
    assert gold["Pleural Effusion"] == "uncertain"
    assert gold["Pneumothorax"] == "not_mentioned"
    assert gold["Fracture"] == "present"
    assert gold["Lung Lesion"] == "not_mentioned"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "x", "label": {}}, "study_id"),
        ({"study_id": "s1", "text": "x", "label": [1, 0]}, "'label' must be an object"),
        ({"study_id": "s1", "text": "x", "label": {"Edema": 5}}, "expected 1, 0, -1 or null"),
        ({"study_id": "s1", "text": "x", "label": {"Edema": True}}, "boolean"),
    ],
)
def test_read_chexgpt_jsonl_errors(tmp_path: Path, record: dict[str, object], message: str) -> None:
    path = write_jsonl(tmp_path / "gold.jsonl", [record])
    with pytest.raises(InputError, match=message) as err:
        read_chexgpt_jsonl(path)
    assert f"{path}:1" in str(err.value)


@pytest.mark.parametrize(
    ("name", "finding"),
    [
        ("Enlarged Cardiom.", "Enlarged Cardiomediastinum"),
        ("LUNG_OPACITY", "Lung Opacity"),
        ("pleural thickening", "Pleural Thickening"),
        ("Pleural", None),  # ambiguous: effusion or thickening
        ("Pneumonia", None),
        ("No Finding", "No Finding"),
    ],
)
def test_match_finding_name(name: str, finding: str | None) -> None:
    assert match_finding_name(name) == finding


# ---------------------------------------------------------------------------------------------
# IU X-ray MeSH presence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "findings"),
    [
        ("Pulmonary Atelectasis/base/left", {"Atelectasis"}),
        ("Cardiomegaly/mild", {"Cardiomegaly"}),
        ("Cardiac Shadow/enlarged/severe", {"Cardiomegaly"}),
        ("Cardiac Shadow/borderline", set()),
        ("Consolidation/lung/base/right", {"Consolidation"}),
        ("Pulmonary Edema/interstitial", {"Edema"}),
        ("Mediastinum/prominent", {"Enlarged Cardiomediastinum"}),
        ("Mediastinum/right/paratracheal/prominent/mild", {"Enlarged Cardiomediastinum"}),
        ("Fractures, Bone/ribs/right/healed", {"Fracture"}),
        ("Infiltrate/lung/lower lobe/left", {"Infiltrate"}),
        ("Nodule/lung/upper lobe/right", {"Lung Lesion"}),
        ("Mass/lung/hilum/right", {"Lung Lesion"}),
        ("Mass/breast/large", set()),
        ("Opacity/lung/base/left/mild", {"Lung Opacity"}),
        ("Opacity/ribs/left", set()),
        ("Airspace Disease/lung/base/bilateral", {"Lung Opacity"}),
        ("normal", {"No Finding"}),
        ("Pleural Effusion/bilateral/small", {"Pleural Effusion"}),
        ("Thickening/pleura/apex/left", {"Pleural Thickening"}),
        ("Thickening/bronchovascular", set()),
        ("Pneumothorax/apex/right", {"Pneumothorax"}),
        ("Calcified Granuloma/lung/base/right", set()),
        ("Pulmonary Congestion/mild", set()),
    ],
)
def test_iu_mesh_mapping(term: str, findings: set[str]) -> None:
    assert iu_mesh_findings(term) == findings


def test_iu_presence_gold_on_hand_made_records(tmp_path: Path) -> None:
    records = [
        {"report_id": "iu-1", "findings": "a", "impression": "b", "mesh": ["normal"], "problems": ["normal"]},
        {
            "report_id": "iu-2",
            "findings": "",
            "impression": "c",
            "mesh": ["Cardiomegaly/mild", "Opacity/lung/base/left", "Calcinosis/aorta"],
            "problems": ["Cardiomegaly", "Opacity", "Calcinosis"],
        },
        {"report_id": "iu-3", "findings": "d", "impression": "", "mesh": ["No Indexing"], "problems": []},
    ]
    gold = iu_presence_gold(write_jsonl(tmp_path / "iu.jsonl", records))
    assert list(gold) == ["iu-1", "iu-2"]  # "No Indexing" records were never coded
    assert {f for f, present in gold["iu-1"].items() if present} == {"No Finding"}
    assert {f for f, present in gold["iu-2"].items() if present} == {"Cardiomegaly", "Lung Opacity"}
    assert all(len(v) == len(FINDINGS) for v in gold.values())


def test_iu_presence_gold_requires_mesh(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "iu.jsonl", [{"report_id": "iu-1", "findings": "x"}])
    with pytest.raises(InputError, match="mesh"):
        iu_presence_gold(path)


def test_iu_report_text_joins_findings_and_impression() -> None:
    record = {"findings": " Lungs clear. ", "impression": "Normal.", "indication": "cough"}
    assert iu_report_text(record) == "FINDINGS: Lungs clear.\nIMPRESSION: Normal."
    assert iu_report_text({"findings": "", "impression": "Normal."}) == "IMPRESSION: Normal."
    assert iu_report_text({"findings": "", "impression": ""}) == ""


# ---------------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------------


def test_read_gold_sniffs_each_format(tmp_path: Path) -> None:
    labels = write_jsonl(tmp_path / "a.jsonl", [{"report_id": "r1", "labels": all_findings()}])
    chexgpt = write_jsonl(tmp_path / "b.jsonl", [{"study_id": "s1", "text": "", "label": {"Edema": 1}}])
    iu = write_jsonl(tmp_path / "c.jsonl", [{"report_id": "iu-1", "mesh": ["normal"]}])
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("report_id,Edema\nr1,1.0\n", encoding="utf-8")
    assert read_gold(labels).kind == "status"
    assert read_gold(chexgpt) == GoldSet("status", {"s1": all_findings(Edema="present")})
    assert read_gold(csv_path).labels == {"r1": all_findings(Edema="present")}
    iu_gold = read_gold(iu)
    assert iu_gold.kind == "presence"
    assert iu_gold.labels["iu-1"]["No Finding"] is True


def test_read_gold_explicit_format_and_errors(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"report_id": "iu-1", "mesh": ["Pneumothorax"]}])
    assert read_gold(path, fmt="iu").labels["iu-1"]["Pneumothorax"] is True
    with pytest.raises(ValueError, match="unknown gold format"):
        read_gold(path, fmt="xml")
    with pytest.raises(InputError, match="no such gold file"):
        read_gold(tmp_path / "missing.jsonl")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"report_id": "r1"}])
    with pytest.raises(InputError, match="cannot tell the gold format"):
        read_gold(odd)


@pytest.mark.skipif(not IU_DEV.is_file(), reason=f"IU X-ray data not available at {IU_DEV}")
def test_real_iu_dev_mapping_has_support_for_every_finding() -> None:
    gold = iu_presence_gold(IU_DEV)
    assert len(gold) > 1500
    support = {f: sum(labels[f] for labels in gold.values()) for f in FINDINGS}
    assert all(count > 0 for count in support.values()), support
    assert support["No Finding"] > support["Cardiomegaly"] > support["Pneumothorax"]


# ---------------------------------------------------------------------------------------------
# IU halves and the radlabels peer labels
# ---------------------------------------------------------------------------------------------


def test_iu_half_follows_the_design_hash() -> None:
    # sha256("iu-1") is odd -> locked; sha256("iu-3") is even -> development (DESIGN.md section 6).
    import hashlib

    for report_id in ("iu-1", "iu-3", "iu-4", "iu-11"):
        odd = int(hashlib.sha256(report_id.encode()).hexdigest(), 16) % 2 == 1
        assert iu_half(report_id) == ("locked" if odd else "development")


@needs_shared(IU_DEV)
def test_iu_halves_have_the_sizes_design_states() -> None:
    ids = [json.loads(line)["report_id"] for line in IU_DEV.read_text(encoding="utf-8").splitlines() if line]
    halves = [iu_half(report_id) for report_id in ids]
    assert (halves.count("locked"), halves.count("development")) == (960, 907)


def test_radlabels_peer_labels_map_to_the_13_findings(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "peer.jsonl",
        [
            {
                "report_id": "a",
                "text": "...",
                "peer_labels": {
                    "atelectasis": "uncertain",
                    "lobar_segmental_collapse": "definitely present",
                    "pneumothorax": "definitely absent",
                    "endotracheal_tube": "definitely present",
                },
            },
            {"report_id": "b", "text": "...", "peer_labels": {"pneumothorax": "definitely absent"}},
        ],
    )
    gold = read_radlabels_jsonl(path)
    assert gold["a"]["Atelectasis"] == "present"  # the strongest of the peer findings that map to it
    assert gold["a"]["Pneumothorax"] == "absent"
    assert gold["a"]["No Finding"] == "not_mentioned"
    assert gold["b"]["No Finding"] == "present"  # devices and absent findings leave No Finding present
    assert read_gold(path).kind == "status"


def test_radlabels_reader_names_the_line_of_a_bad_value(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "peer.jsonl", [{"report_id": "a", "peer_labels": {"pneumothorax": "maybe"}}])
    with pytest.raises(InputError, match=r"peer.jsonl:1: 'pneumothorax' has value 'maybe'"):
        read_radlabels_jsonl(path)


@needs_shared(RADLABELS)
def test_real_radlabels_file_reads() -> None:
    gold = read_radlabels_jsonl(RADLABELS)
    assert len(gold) == 1000
    assert sum(labels["Pleural Effusion"] == "present" for labels in gold.values()) > 300
