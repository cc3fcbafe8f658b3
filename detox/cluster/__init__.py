"""Cluster tooling: an EC2 cluster for ``engine=mpi`` (``python -m detox.cluster.ec2``), MPI hostfiles, and host
provisioning over ssh (``python -m detox.cluster.provision <hostfile>``).

Slurm and local parallel sweeps need no code here: they are Hydra launcher presets in ``conf/hydra/launcher/``.
Importing this package stays cheap (no boto3): ``detox.config`` uses the hostfile parser.
"""
