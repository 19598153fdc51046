"""Stage 8, tracking: the one gateway to MLflow. Every ``kdbench.*`` tag key is defined once in :mod:`.tags`;
:class:`~kdbench.tracking.base.Tracker` is the interface the rest of kdbench uses, :mod:`.mlflow` its MLflow
implementation. No other module imports mlflow."""
