"""Stage 9, reports: runs read back from the tracker into a DataFrame (:mod:`.store`), leaderboards with intervals
(:mod:`.leaderboard`), figures (:mod:`.figures`) and cross-study tables (:mod:`.compare`)."""
