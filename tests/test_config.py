"""Study-file validation: every problem is one line naming the file and the field."""
import copy

import pytest
import yaml

from kdbench.config import load_study, parse_study
from kdbench.errors import KdbenchError
from kdbench.study.checks import check_study

BASE = {
    "name": "t",
    "teacher": {"model": "test_resnet", "epochs": 1},
    "student": {"model": "test_resnet"},
    "losses": ["kd"],
}


def with_(path, value):
    d = copy.deepcopy(BASE)
    node = d
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return d


def test_minimal_study_gets_documented_defaults():
    cfg = parse_study(BASE)
    assert cfg.data.dataset == "digits" and cfg.data.image_size == 32
    assert (cfg.data.splits.train, cfg.data.splits.val, cfg.data.splits.test) == (0.6, 0.2, 0.2)
    assert cfg.train.device == "auto" and cfg.train.precision == "fp32"
    assert cfg.sweep.sampler == "tpe" and cfg.sweep.pruner == "median" and cfg.sweep.select == "last"
    assert cfg.confirm.seed_list == [0, 1, 2]
    assert cfg.losses[0].name == "kd" and cfg.losses[0].key == "kd"


@pytest.mark.parametrize(
    "path,value,pattern",
    [
        ("train.epochs", -1, r"study: train\.epochs: Input should be greater than 0 \(got -1\)"),
        ("teacher.epochs", -1, r"teacher\.epochs: Input should be greater than or equal to 0"),
        ("teacher.epochs", 0, r"teacher: epochs: 0 uses the teacher as it is: it needs 'pretrained' weights"),
        ("train.optimizer", "rmsprop", r"train\.optimizer: Input should be 'sgd', 'adam' or 'adamw'"),
        ("data.splits", {"train": 0.5, "val": 0.2, "test": 0.2}, r"data\.splits: train \+ val \+ test must be 1"),
        ("data.student_label_noise", 1.5, r"data\.student_label_noise: .*less than 1"),
        ("train.device", "gpu", r"train\.device: must be auto, cpu, cuda"),
        ("train.bogus", 1, r"train\.bogus: unknown field"),
        ("name", "bad name!", r"name: String should match pattern"),
        ("sweep.trials", 0, r"sweep\.trials: Input should be greater than 0"),
        ("confirm.seeds", [1, 1], r"confirm\.seeds: must be a non-empty list of distinct seeds"),
        ("losses", [], r"losses: List should have at least 1 item"),
        ("losses", ["kd", "kd"], r"losses: loss 'kd' appears twice"),
    ],
)
def test_schema_errors_name_the_field(path, value, pattern):
    with pytest.raises(KdbenchError, match=pattern) as err:
        parse_study(with_(path, value))
    assert "\n" not in str(err.value)


def test_missing_required_fields():
    d = copy.deepcopy(BASE)
    del d["student"]
    with pytest.raises(KdbenchError, match=r"student: missing required field"):
        parse_study(d)


@pytest.mark.parametrize(
    "path,value,pattern",
    [
        ("losses", ["kdd"], r"losses\[0\]\.name: unknown loss 'kdd'; did you mean 'kd'"),
        ("losses", [{"name": "kd", "params": {"temp": 2}}], r"losses\[0\]\.params: 'kd' has no parameter 'temp'"),
        ("losses", [{"name": "kd", "params": {"temperature": -2}}], r"losses\[0\]\.params: temperature must be > 0"),
        ("losses", [{"name": "kd", "search": {"alpha": {"low": 0.5, "high": 2}}}],
         r"losses\[0\]\.search\.alpha: must lie within \[0, 1\]"),
        ("teacher.model", "resnet181", r"teacher\.model: unknown timm model 'resnet181'; did you mean"),
        ("student.model", "no_such_net", r"student\.model: unknown timm model 'no_such_net'"),
        ("teacher.checkpoint", "/nonexistent/t.safetensors", r"teacher\.checkpoint: file not found"),
        ("data.dataset", "imagenet", r"data\.dataset: unknown data set 'imagenet'"),
    ],
)
def test_registry_and_model_checks(path, value, pattern):
    cfg = parse_study(with_(path, value))
    with pytest.raises(KdbenchError, match=pattern):
        check_study(cfg, "study")


def test_bad_search_spec_is_a_schema_error():
    d = with_("losses", [{"name": "kd", "search": {"temperature": {"low": 5, "high": 1}}}])
    with pytest.raises(KdbenchError, match=r"losses\[0\]\.search\.temperature: low \(5\.0\) must not exceed high"):
        parse_study(d)


def test_resolved_space_fixed_params_win_and_null_removes():
    d = with_("losses", [{"name": "kd", "params": {"temperature": 2.0}, "search": {"alpha": None}},
                         {"name": "kd", "label": "kd_t", "search": {"temperature": {"low": 2, "high": 3}}}])
    a, b = check_study(parse_study(d))
    assert a.space == {} and a.values({})["temperature"] == 2.0 and a.values({})["alpha"] == 0.9
    assert set(b.space) == {"temperature", "alpha"} and b.space["temperature"].high == 3
    assert b.first_trial() == {"temperature": 4.0, "alpha": 0.9}


def test_file_errors(tmp_path):
    with pytest.raises(KdbenchError, match=r"nope\.yaml: study file not found"):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(KdbenchError, match=r"bad\.yaml: invalid YAML at line"):
        load_study(bad)
    notmap = tmp_path / "list.yaml"
    notmap.write_text("- 1\n- 2\n")
    with pytest.raises(KdbenchError, match=r"list\.yaml: a study file must be a YAML mapping"):
        load_study(notmap)


def test_shipped_studies_validate():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("studies/*.yaml")):
        cfg = load_study(path)
        assert yaml.safe_load(path.read_text())["name"] == cfg.name
        if cfg.data.root is not None:  # file-based data: validated against a fake root in test_readers.py
            assert not cfg.data.download, f"{path}: shipped studies never download"
            continue
        check_study(cfg, str(path))


def test_colliding_own_parameter_is_namespaced():
    d = with_("losses", [{"name": "dkd", "params": {"dkd.alpha": 2.0, "alpha": 0.7},
                          "search": {"dkd.beta": {"low": 1, "high": 4}}}])
    (e,) = check_study(parse_study(d))
    from kdbench.study.plan import split_values

    own, mix = split_values(e.values({"beta": 3.0}), "dkd")
    assert own["alpha"] == 2.0 and own["beta"] == 3.0 and own["temperature"] == 4.0
    assert mix["alpha"] == 0.7 and mix["weighting"] == "none"
    assert set(e.space) == {"temperature", "beta"}  # dkd.beta → beta; the fixed mix alpha is not searched


def test_weighting_knobs_validated():
    d = with_("losses", [{"name": "kd", "params": {"weighting": "sometimes"}}])
    with pytest.raises(KdbenchError, match=r"weighting must be one of none, pmax, threshold"):
        check_study(parse_study(d))
    d = with_("losses", [{"name": "dist", "params": {"weighting": "pmax"}}])
    with pytest.raises(KdbenchError, match=r"'dist' has no per-sample values, so it cannot be weighted"):
        check_study(parse_study(d))


def test_several_teachers_and_students():
    d = copy.deepcopy(BASE)
    d["teacher"] = [{"model": "test_resnet", "epochs": 1}, {"model": "test_efficientnet", "epochs": 1, "weight": 2}]
    d["student"] = [{"model": "test_resnet"}, {"model": "test_resnet", "label": "wide", "kwargs": {}}]
    cfg = parse_study(d)
    check_study(cfg)
    assert [t.weight for t in cfg.teachers] == [1.0, 2.0] and [s.key for s in cfg.students] == ["test_resnet", "wide"]
    d["teacher"][1]["epochs"] = -1
    with pytest.raises(KdbenchError, match=r"study: teacher\[1\]\.epochs: Input should be greater than or equal to 0 \(got -1\)$"):
        parse_study(d)
    d["teacher"][1]["epochs"] = 1
    d["student"][1]["label"] = None
    with pytest.raises(KdbenchError, match=r"student: student 'test_resnet' appears twice"):
        parse_study(d)
    d["student"][1]["model"] = "nope_net"
    with pytest.raises(KdbenchError, match=r"student\[1\]\.model: unknown timm model 'nope_net'"):
        check_study(parse_study(d))


def test_ce_weight_gives_exactly_published_weights_in_the_logged_parts(logits):
    """``ce_weight: 1.0`` with alpha: total = 1.0·CE + alpha·weight·loss (DKD's 1.0·CE + 1.0·DKD is writable);
    unset, it stays (1 − alpha)·CE."""
    import torch

    from kdbench.engine.objectives import Batch, DistillObjective
    from kdbench.engine.teacher_outputs import TeacherProvider

    zs, _, y = logits
    (e, plain) = check_study(parse_study(with_("losses", [
        {"name": "kd", "params": {"ce_weight": 1.0, "alpha": 0.6, "weight": 2.0}},
        {"name": "kd", "label": "plain", "params": {"alpha": 0.6}}])))
    assert "ce_weight" not in e.space and e.values({})["ce_weight"] == 1.0
    for entry in (e, plain):
        loss, mix = entry.build(entry.values({}))
        obj = DistillObjective(loss, TeacherProvider([torch.nn.Linear(10, 10)]), mix["alpha"], mix["weight"],
                               ce_weight=mix["ce_weight"])
        total, terms = obj(torch.nn.Linear(10, 10), Batch(x=zs, y=y, idx=torch.arange(len(y)), epoch=0.0))
        weights = (1.0, 0.6 * 2.0) if entry is e else (1.0 - 0.6, 0.6)
        assert terms["weighted_ce"].item() == (weights[0] * terms["ce"]).item()
        assert terms["weighted_kd"].item() == (weights[1] * terms["kd"]).item()
        assert total.item() == (terms["weighted_ce"] + terms["weighted_kd"]).item()
    with pytest.raises(KdbenchError, match=r"losses\[0\]\.params\.ce_weight: must be a number ≥ 0, got -1"):
        check_study(parse_study(with_("losses", [{"name": "dkd", "params": {"ce_weight": -1}}])))


def test_reference_rows_checked_and_outside_the_fingerprint():
    ref = {"source": "Table 1 of a paper", "acc": {"teacher": 79.42, "ce": 72.5, "kd": 73.33}}
    assert parse_study({**BASE, "reference": ref}).fingerprint() == parse_study(BASE).fingerprint()
    check_study(parse_study({**BASE, "reference": ref}))
    bad = {**ref, "acc": {"dkd": 76.32}}
    rows = r"rows are \['teacher', 'ce', 'kd'\]"
    with pytest.raises(KdbenchError, match=r"reference\.acc\.dkd: no such leaderboard row; " + rows):
        check_study(parse_study({**BASE, "reference": bad}))
    with pytest.raises(KdbenchError, match=r"reference\.acc\.kd: Input should be less than or equal to 100"):
        parse_study({**BASE, "reference": {**ref, "acc": {"kd": 0.7333 * 1000}}})
