"""Stage 5, training: ``fit`` trains one network for N epochs with a per-epoch hook (:mod:`.train`), the CE and
distillation objectives (:mod:`.objectives`), teachers trained, loaded and cached (:mod:`.teacher`), their outputs
live or cached (:mod:`.teacher_outputs`), feature taps (:mod:`.taps`), temperature schedules, device and precision
helpers, safetensors checkpoints. Knows nothing of Optuna or MLflow: callers pass an ``on_epoch`` hook."""
