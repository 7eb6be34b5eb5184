"""Gold-standard readers: formats, error cases and the IU X-ray MeSH mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import IU_DEV, RADLABELS, needs_shared

from deberta_rad.comparison import compare_labelers, format_comparison_table
from deberta_rad.data import InputError, iu_report_text, read_reports
from deberta_rad.evaluate import score_files
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
from deberta_rad.metrics import compute_metrics, format_metrics_table
from deberta_rad.schema import FINDINGS, LabelRecord


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
    gold_set = read_chexpert_csv(path)
    gold = gold_set.labels
    assert list(gold) == ["chexbert-1", "chexbert-2"]  # data.csv_report_id: <file stem>-<data row>
    assert gold["chexbert-1"]["Pneumothorax"] == "absent"
    assert gold["chexbert-1"]["Pleural Effusion"] == "present"
    assert gold["chexbert-2"]["Cardiomegaly"] == "uncertain"
    assert gold["chexbert-2"]["Edema"] == "present"
    assert list(gold["chexbert-1"]) == list(FINDINGS)
    # CheXpert has no Infiltrate or Pleural Thickening column: those are not scored (not "not mentioned").
    assert gold_set.not_scored == ["Infiltrate", "Pleural Thickening"]
    assert gold_set.findings == tuple(f for f in FINDINGS if f not in ("Infiltrate", "Pleural Thickening"))


def test_read_chexpert_csv_takes_the_id_column(tmp_path: Path) -> None:
    path = tmp_path / "gold.csv"
    path.write_text("study_id,Edema,Atelectasis\ns1,1.0,\ns2,,0.0\n", encoding="utf-8")
    gold_set = read_chexpert_csv(path)
    assert gold_set.labels["s1"]["Edema"] == "present"
    assert gold_set.labels["s2"]["Atelectasis"] == "absent"
    assert gold_set.findings == ("Atelectasis", "Edema")


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


# A CheXbert labeler's output: the 14 CheXpert observations, no report id column.
CHEXBERT_HEADER = (
    "Report Impression,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,Lung Lesion,Edema,Consolidation,"
    "Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,Fracture,Support Devices,No Finding"
)
CHEXBERT_ROWS = [
    '"Enlarged cardiomediastinum, cardiomegaly, opacity.",1.0,1.0,1.0,,,,,,0.0,,,,,',
    '"No nodule. Maybe edema, consolidation.",,0.0,,0.0,-1.0,-1.0,,,,,,,,',
    '"Atelectasis. Small effusion. Rib fracture.",,,,,1.0,,,1.0,,1.0,,1.0,1.0,',
    '"Possible pneumothorax, no effusion, nodule.",-1.0,,0.0,1.0,0.0,1.0,,-1.0,-1.0,0.0,,0.0,,',
    '"Normal chest.",0.0,0.0,,,0.0,0.0,,0.0,0.0,0.0,,,,1.0',
    '"Clear lungs, heart normal.",,,,,,,,,,,,,,0.0',
]
NOT_IN_CHEXBERT = ["Infiltrate", "Pleural Thickening"]


def chexbert_csv(path: Path) -> Path:
    path.write_text("\n".join([CHEXBERT_HEADER, *CHEXBERT_ROWS]) + "\n", encoding="utf-8")
    return path


def test_a_chexbert_csv_scored_against_itself_is_perfect_and_says_what_it_does_not_score(tmp_path: Path) -> None:
    """Gold from the gold reader; predictions are the same labels on the ids the report reader gives the
    same CSV (what `label --input` would key them by), saying `present` for the findings the CSV has no
    column for: those must neither count against the labeler nor be scored as not_mentioned."""
    csv_path = chexbert_csv(tmp_path / "chexbert.csv")
    gold = read_gold(csv_path)
    assert gold.kind == "status" and gold.not_scored == NOT_IN_CHEXBERT
    report_ids = [report.report_id for report in read_reports(csv_path)]
    assert report_ids == list(gold.labels)
    records = [
        LabelRecord(report_id=rid, labels=labels | dict.fromkeys(NOT_IN_CHEXBERT, "present"))
        for rid, labels in zip(report_ids, gold.labels.values(), strict=True)
    ]
    predictions = write_jsonl(tmp_path / "predictions.jsonl", [r.model_dump(exclude_none=True) for r in records])

    metrics = score_files(predictions, csv_path)
    assert metrics["macro_f1"] == 1.0
    assert metrics["findings_not_scored"] == NOT_IN_CHEXBERT
    assert metrics["findings_left_out"] == []  # each of the 11 scored findings has gold support here
    assert list(metrics["per_finding"]) == [f for f in FINDINGS if f not in NOT_IN_CHEXBERT]
    assert all(m["f1"] == 1.0 for m in metrics["per_finding"].values())
    assert all(f1 == 1.0 for f1 in metrics["status_f1"].values())
    assert metrics["agreement"] == 1.0 and metrics["kappa"] == 1.0
    assert metrics["n_cells"] == len(CHEXBERT_ROWS) * (len(FINDINGS) - len(NOT_IN_CHEXBERT))
    table = format_metrics_table(metrics)
    assert "Not scored (the gold does not code them): Infiltrate, Pleural Thickening" in table
    assert "2 of 13 not scored" in table
    assert not any(line.startswith(("Infiltrate ", "Pleural Thickening ")) for line in table.splitlines())


def test_the_same_csv_without_the_unscored_columns_would_have_been_worse(tmp_path: Path) -> None:
    """What scoring the missing columns as not_mentioned did: the labeler's `present` became false
    positives (the status F1 of present drops); with the gold's findings they are not scored."""
    gold = read_gold(chexbert_csv(tmp_path / "chexbert.csv"))
    predictions = {rid: labels | dict.fromkeys(NOT_IN_CHEXBERT, "present") for rid, labels in gold.labels.items()}
    assert compute_metrics(predictions, gold.labels)["status_f1"]["present"] < 1.0
    assert compute_metrics(predictions, gold.labels, gold.findings)["status_f1"]["present"] == 1.0


def test_compare_on_a_chexbert_csv_lists_the_unscored_findings(tmp_path: Path) -> None:
    gold = read_gold(chexbert_csv(tmp_path / "chexbert.csv"))
    same = {rid: labels | dict.fromkeys(NOT_IN_CHEXBERT, "present") for rid, labels in gold.labels.items()}
    other = {rid: labels | dict.fromkeys(NOT_IN_CHEXBERT, "absent") for rid, labels in gold.labels.items()}
    comparison = compare_labelers(gold.labels, {"a": same, "b": other}, n_bootstrap=20, findings=gold.findings)
    assert comparison["findings_not_scored"] == NOT_IN_CHEXBERT
    assert comparison["labelers"]["a"]["macro_f1"] == comparison["labelers"]["b"]["macro_f1"] == 1.0
    assert set(comparison["labelers"]["a"]["finding_f1"]).isdisjoint(NOT_IN_CHEXBERT)
    (pair,) = comparison["pairs"]
    assert pair["disagreements"]["n_total"] == 0  # they differ only on findings the gold cannot score
    assert "Not scored (the gold does not code them): Infiltrate, Pleural Thickening" in format_comparison_table(
        comparison
    )


@pytest.mark.parametrize(
    ("header", "row", "expected"),
    [
        ("Report Impression,Edema", '"Edema.",1.0', "reports-1"),  # no id column: <file stem>-<data row>
        ("report_id,Report Impression,Edema", 'r-7,"Edema.",1.0', "r-7"),
        ("study_id,text,Edema", ' 501 ,"Edema.",1.0', "501"),  # stripped alike
        (" study_id , text ,Edema", '502,"Edema.",1.0', "502"),  # header names stripped alike
    ],
)
def test_the_report_reader_and_the_gold_reader_give_a_csv_the_same_ids(
    tmp_path: Path, header: str, row: str, expected: str
) -> None:
    path = tmp_path / "reports.csv"
    path.write_text(f"{header}\n{row}\n", encoding="utf-8")
    assert [r.report_id for r in read_reports(path)] == list(read_chexpert_csv(path).labels) == [expected]


def test_an_empty_id_is_the_same_error_for_both_readers(tmp_path: Path) -> None:
    path = tmp_path / "reports.csv"
    path.write_text('study_id,text,Edema\n  ,"Edema.",1.0\n', encoding="utf-8")
    for read in (read_reports, read_chexpert_csv):
        with pytest.raises(InputError, match=rf"{path.name}:2: empty study_id"):
            read(path)


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
    gold_set = read_chexgpt_jsonl(path)
    gold = gold_set.labels["501"]
    assert gold["Atelectasis"] == "present"
    assert gold["Cardiomegaly"] == "absent"
    assert gold["Edema"] == "uncertain"
    assert gold["Enlarged Cardiomediastinum"] == "present"
    assert gold["Pleural Effusion"] == "uncertain"
    assert gold["Pneumothorax"] == "not_mentioned"
    assert gold["Fracture"] == "present"
    assert gold["Lung Lesion"] == "not_mentioned"
    # Findings no record names are not scored; a named finding with null is gold not_mentioned.
    named = {"Atelectasis", "Cardiomegaly", "Edema", "Enlarged Cardiomediastinum", "Pleural Effusion"}
    named |= {"Pneumothorax", "Fracture"}
    assert gold_set.findings == tuple(f for f in FINDINGS if f in named)
    assert gold_set.not_scored == [f for f in FINDINGS if f not in named]


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
    assert read_gold(chexgpt) == GoldSet("status", {"s1": all_findings(Edema="present")}, ("Edema",))
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
