"""Checkpoints load without executing code, and a checkpoint that does not fit says why in one line."""
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from kdbench.engine.checkpoints import load_into, read_state, save_checkpoint
from kdbench.errors import KdbenchError
from kdbench.models import create_model
from kdbench.engine.teacher import load_state

MARKER = "kdbench_pwned_marker"


class Evil:
    """Unpickling this calls os.system (via __reduce__): it must never run."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    target = tmp_path / MARKER
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil(target)}, f)
    with pytest.raises(KdbenchError, match=r"teacher\.checkpoint: cannot load .*evil\.pt safely"):
        read_state(path, "teacher.checkpoint")
    assert not target.exists()
    # and through torch.save's zip format as well
    path2 = tmp_path / "evil2.pt"
    torch.save({"w": Evil(target)}, path2)
    with pytest.raises(KdbenchError, match="safely"):
        read_state(path2, "teacher.checkpoint")
    assert not target.exists()


def test_state_dicts_load_from_safetensors_and_weights_only_pickles(tmp_path):
    model = create_model("test_resnet", 10, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": state}, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        fresh = create_model("test_resnet", 10, 1)
        load_state(fresh, tmp_path / name, "teacher.checkpoint")
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_mismatched_checkpoints_say_which(tmp_path):
    ten = create_model("test_resnet", 10, 1)
    save_file(ten.state_dict(), str(tmp_path / "ten.safetensors"))
    with pytest.raises(KdbenchError, match=r"does not match the model: 10 classes in the checkpoint, 100 in the study"):
        load_state(create_model("test_resnet", 100, 1), tmp_path / "ten.safetensors", "teacher.checkpoint")
    with pytest.raises(KdbenchError, match=r"a different architecture: .* missing .*unknown tensors"):
        load_state(create_model("resnet18", 10, 1), tmp_path / "ten.safetensors", "teacher.checkpoint")
    with pytest.raises(KdbenchError, match=r"'conv1\.0\.weight' is \(16, 1, 3, 3\) in the checkpoint, \(16, 3, 3, 3\)"):
        load_state(create_model("test_resnet", 10, 3), tmp_path / "ten.safetensors", "teacher.checkpoint")
    (tmp_path / "ten.json").write_text(json.dumps({"model": "test_resnet"}))
    with pytest.raises(KdbenchError, match=r"holds a 'test_resnet', the study asks for 'resnet18'"):
        load_state(create_model("resnet18", 10, 1), tmp_path / "ten.safetensors", "teacher.checkpoint", "resnet18")


def test_student_checkpoint_round_trip_with_loss_parts(tmp_path):
    from kdbench.losses import create_loss

    student = create_model("test_resnet", 10, 1)
    loss = create_loss("cosine")
    from kdbench.losses.base import LossContext, Outputs

    loss.setup(Outputs(embedding=torch.zeros(2, 96)), Outputs(embedding=torch.zeros(2, 32)), LossContext(10))
    path = save_checkpoint(tmp_path / "s.safetensors", student, loss, {"model": "test_resnet"})
    state = read_state(path, "student")
    assert any(k.startswith("loss.") for k in state) and any(k.startswith("student.") for k in state)
    fresh = create_model("test_resnet", 10, 1)
    load_into(fresh, {k[8:]: v for k, v in state.items() if k.startswith("student.")}, path, "student")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_mode_not_safetensors_0600(tmp_path, umask):
    """A teacher cache shared by a group: the weights are as readable as the JSON beside them."""
    import os
    import stat

    from kdbench.engine.checkpoints import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda p: save_file({"x": torch.zeros(2)}, str(p)))
        atomic_write(tmp_path / "w.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"w.safetensors": 0o666 & ~umask, "w.json": 0o666 & ~umask}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
