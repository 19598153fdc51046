"""What each model of a study is fed under timm's transforms: its own data config, and the one training view all
models share."""
from __future__ import annotations

from kdbench.data import DataBundle
from kdbench.models import create_model, data_config


class ModelInputs:
    """Each student's data config (from its architecture and tag: no weights needed), the teachers' (from their
    loaded models), and the training view: made at the largest input size of all models with the first teacher's
    interpolation and crop, so the teacher's cached outputs serve every student; each model resizes and normalises
    it for itself (:class:`~kdbench.engine.taps.ModelFeed`)."""

    def __init__(self, cfg, data: DataBundle, infos):
        self.cfg = cfg
        self.teachers = [i.data_config for i in infos]
        self.students = {}
        for st in cfg.students:
            probe = create_model(st.model, data.num_classes, data.in_chans, st.kwargs)
            self.students[st.key] = data_config(probe, st.input.overrides() if st.input is not None else None)
        dcs = self.teachers + list(self.students.values())
        size = tuple(max(dc["input_size"][k] for dc in dcs) for k in range(3))
        self.view = {**self.teachers[0], "input_size": size}

    def data_for(self, data: DataBundle, st=None) -> DataBundle:
        """A student's sets (its eval transform, the shared training views), or without one the training views."""
        return data.for_model(self.students[st.key] if st is not None else self.view, self.view)

    def text(self) -> str:
        """One line for the leaderboard: each model's input."""
        def one(who, dc):
            return f"{who} {dc['input_size'][1]}×{dc['input_size'][2]} ({dc['interpolation']}, crop {dc['crop_pct']})"

        models = [one(f"teacher {t.model}", dc) for t, dc in zip(self.cfg.teachers, self.teachers)]
        models += [one(f"student {st.model}", self.students[st.key]) for st in self.cfg.students]
        size = self.view["input_size"]
        return (f"through timm's transforms, each model at its own data config: {'; '.join(models)}; training views "
                f"made at {size[1]}×{size[2]} and resized for each model")
