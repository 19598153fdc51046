"""The package's layout holds: stages import only stages above them, importing kdbench and the light commands load
neither torch nor timm, only the tracking gateway imports mlflow, and every kdbench.* tag key is defined once."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdbench.cli import main

PKG = Path(__file__).resolve().parents[1] / "kdbench"
# a stage may import itself and the stages before it, never one after it
ORDER = ["errors", "config", "data", "models", "losses", "engine", "sweep", "tracking", "study", "report", "api", "cli"]


def stage(module: str) -> str:
    parts = module.split(".")
    if parts[1:] == ["__main__"]:  # ``python -m kdbench`` is the command line
        return "cli"
    return parts[1] if len(parts) > 1 else "api"  # kdbench itself (the lazy __init__) sits with the API


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, also those inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


MODULES = sorted(p for p in PKG.rglob("*.py"))


def module_name(p: Path) -> str:
    rel = p.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_module_belongs_to_a_stage():
    for p in MODULES:
        name = module_name(p)
        assert stage(name).removesuffix(".py") in ORDER or name == "kdbench", name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_a_stage_imports_no_later_stage(path):
    own = ORDER.index(stage(module_name(path)))
    for line, mod in imports(path):
        if mod == "kdbench" or not mod.startswith("kdbench."):
            continue
        assert ORDER.index(stage(mod)) <= own, f"{path.name}:{line} imports {mod} (a later stage)"


def test_only_the_tracking_gateway_imports_mlflow():
    users = {module_name(p) for p in MODULES for _, mod in imports(p) if mod.split(".")[0] == "mlflow"}
    assert users == {"kdbench.tracking.mlflow"}


def test_only_sweep_study_and_report_figures_import_optuna():
    users = {module_name(p) for p in MODULES for _, mod in imports(p) if mod.split(".")[0] == "optuna"}
    assert users and all(u.startswith(("kdbench.sweep", "kdbench.study", "kdbench.report.figures")) for u in users)


def is_module(name: str) -> bool:
    path = PKG.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def test_tag_keys_are_defined_once():
    """No ``"kdbench.<key>"`` literal outside tracking/tags.py, but for the Optuna user-attr keys of sweep/slots.py."""
    allowed = {"kdbench.tracking.tags", "kdbench.sweep.slots"}
    found = []
    for p in MODULES:
        if module_name(p) in allowed:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("kdbench.") \
                    and " " not in node.value and not is_module(node.value):
                found.append(f"{p.relative_to(PKG)}:{node.lineno} {node.value}")
    assert not found


def test_no_loss_imports_another_loss():
    losses = {p.stem for p in (PKG / "losses").glob("*.py")} - {"__init__", "base", "card", "outputs", "functional",
                                                                 "_registry", "_shared", "combine", "weighting"}
    for p in (PKG / "losses").glob("*.py"):
        for line, mod in imports(p):
            assert mod.removeprefix("kdbench.losses.") not in losses or mod == f"kdbench.losses.{p.stem}", \
                f"{p.name}:{line} imports {mod}"


def loaded_after(code: str) -> set:
    """Which of torch, timm, mlflow a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys; print('LOADED:', *[m for m in ('torch', 'timm', 'mlflow') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=PKG.parent)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.strip().splitlines()[-1].split()[1:])


def test_import_kdbench_loads_neither_torch_nor_timm():
    assert loaded_after("import kdbench") == set()


def test_help_and_losses_load_neither_torch_nor_timm():
    assert loaded_after("from kdbench.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass") == set()
    assert loaded_after("from kdbench.cli import main\nmain(['losses'])") == set()
    assert loaded_after("import kdbench\nkdbench.list_losses()") == set()


def test_models_register_cifar_families_in_timm():
    assert loaded_after("import kdbench.models, timm\nassert timm.is_model('cifar_resnet8x4')") >= {"timm"}


def test_validate_accepts_lists_of_teachers_and_students(tmp_path, capsys):
    study = {"name": "l", "teacher": [{"model": "test_resnet"}, {"model": "test_efficientnet", "weight": 2.0}],
             "student": [{"model": "test_resnet", "label": "a"}, {"model": "test_resnet", "label": "b"}],
             "losses": ["kd"]}
    path = tmp_path / "l.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "teacher test_resnet + test_efficientnet, student a, b" in out
    study["teacher"][1]["model"] = "no_such_net"
    path.write_text(yaml.safe_dump(study))
    assert main(["validate", str(path)]) == 2
    assert "teacher[1].model: unknown timm model 'no_such_net'" in capsys.readouterr().err
    study["teacher"] = {"model": "no_such_net"}  # given alone, it is named without an index
    path.write_text(yaml.safe_dump(study))
    assert main(["validate", str(path)]) == 2
    assert "l.yaml: teacher.model: unknown timm model 'no_such_net'" in capsys.readouterr().err
