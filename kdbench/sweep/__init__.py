"""Stage 7, the sweeps on Optuna: storages (:mod:`.storage`), claimed trial slots with heartbeats (:mod:`.slots`),
the coordinator lease kept outside Optuna's study list (:mod:`.lease`), samplers and pruners (:mod:`.samplers`) and
local worker processes (:mod:`.workers`). Importing this package imports nothing heavy."""
