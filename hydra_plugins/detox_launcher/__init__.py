"""``hydra/launcher=local_parallel`` and ``hydra/launcher=slurm``: Hydra instantiates launchers only from classes
defined under the ``hydra_plugins`` namespace package, so this shim defines them; everything they do lives in
detox.launcher."""

from detox import launcher as _launcher


class ParallelLauncher(_launcher.ParallelLauncher):
    """Local parallel sweeps that survive a dead job: see :mod:`detox.launcher`."""


class SlurmLauncher(_launcher.SlurmLauncher):
    """Slurm sweeps that survive a job ending without a result: see :mod:`detox.launcher`."""
