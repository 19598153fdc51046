"""Stage 6, a study: what is checked before anything is written (:mod:`.checks`, the same for ``validate`` and
``run``), the resolved plan of losses, search spaces and factories (:mod:`.plan`), and the runner that holds the
phases teacher → baseline → sweeps → confirm → export → report (:mod:`.runner`)."""
