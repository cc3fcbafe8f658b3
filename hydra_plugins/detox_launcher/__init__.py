"""``hydra/launcher=local_parallel``: Hydra instantiates launchers only from classes defined under the
``hydra_plugins`` namespace package, so this shim defines the class; everything it does lives in detox.launcher."""

from detox import launcher as _launcher


class ParallelLauncher(_launcher.ParallelLauncher):
    """Local parallel sweeps that survive a dead job: see :mod:`detox.launcher`."""
